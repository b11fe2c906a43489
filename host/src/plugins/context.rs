//! The host side of a plugin's `Context`: SQL, clock, logging and identity.
//!
//! A [`HostContext`] borrows the connection on which the caller has already
//! opened a transaction, so everything a handler does in one call commits or
//! rolls back together. Statements that would end or fork that transaction
//! (`BEGIN`, `COMMIT`, `ATTACH`, …), or write the host's own tables, are
//! refused by [`crate::storage::plugin_sql`]; what plugins need of those
//! tables (counting, pruning dead letters) they ask of the host here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use quiet_plugin_api::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RResult, RSlice, RStr, RString, RVec},
    },
    Envelope, HostRef, HostServices, HostServices_TO, Identity, LogLevel, Pruned, Rows, Value,
};
use rusqlite::{
    types::{ToSqlOutput, ValueRef},
    ToSql,
};

use crate::storage::{
    counters, db, dead_letters,
    event_store::EventStore,
    plugin_sql,
    statements::{Held, Statements},
};

/// The most events one handler call may create: the run's envelope budget
/// bounds them too, and this gives the plugin a clear error first.
pub const MAX_CREATED_PER_CALL: usize = 10_000;

/// What a handler call may use of the host.
pub struct HostContext<'a, 'c> {
    statements: &'a Statements<'c>,
    plugin: &'a str,
    identity: &'a Identity,
    /// Signs the events the call creates; `None` on a host without events.
    store: Option<&'a EventStore>,
    /// The `store_event`s of the events the call created, for the pipeline
    /// to store once the call succeeds.
    created: Vec<Envelope>,
}

impl<'a, 'c> HostContext<'a, 'c> {
    /// A context over the connection of `statements`, which must be inside a
    /// transaction, for a call of `plugin` on the host of `identity`, whose
    /// event store (if it keeps events) is `store`. Plugin statements are
    /// judged and prepared once per `statements`, so a pipeline run shares
    /// one among its calls.
    pub fn new(
        statements: &'a Statements<'c>,
        plugin: &'a str,
        identity: &'a Identity,
        store: Option<&'a EventStore>,
    ) -> Self {
        Self {
            statements,
            plugin,
            identity,
            store,
            created: Vec::new(),
        }
    }

    /// The `store_event` envelopes of the events the call created, in
    /// order: they go through the pipeline before what the call returned,
    /// so that its subscribers see an event before any envelope about it.
    pub fn take_created(&mut self) -> Vec<Envelope> {
        std::mem::take(&mut self.created)
    }

    fn create(
        &mut self,
        network_id: &str,
        event_type: &str,
        content: &Value,
        deps: &[u8],
    ) -> Result<RVec<u8>, String> {
        if self.created.len() >= MAX_CREATED_PER_CALL {
            return Err(format!(
                "a call may create at most {MAX_CREATED_PER_CALL} events"
            ));
        }
        let store = self.store.ok_or("this host keeps no events")?;
        let (id, envelope) = store.create_event(network_id, event_type, content, deps)?;
        self.created.push(envelope);
        Ok(id.to_vec().into())
    }

    /// The FFI-safe handle to pass into a plugin.
    pub fn as_abi(&mut self) -> HostRef<'_> {
        HostServices_TO::from_ptr(self, TD_Opaque)
    }

    fn prepare(&self, sql: &str) -> Result<Held<'a, 'c>, String> {
        self.statements.get_for_plugin(sql, plugin_sql::prepare)
    }

    /// Runs a plugin's query, all of it (preparing, stepping, reading rows)
    /// under the guard: SQLite may re-prepare the statement in a step.
    fn query_rows(&self, sql: &str, params: &[Value]) -> Result<Rows, String> {
        plugin_sql::as_plugin(|| self.query_rows_guarded(sql, params))
    }

    fn query_rows_guarded(&self, sql: &str, params: &[Value]) -> Result<Rows, String> {
        let mut stmt = self.prepare(sql)?;
        let columns: RVec<RString> = stmt.column_names().into_iter().map(RString::from).collect();
        let n = columns.len();
        let params = bind(params)?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| e.to_string())?;
        let mut out = RVec::new();
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let mut values = RVec::with_capacity(n);
            for i in 0..n {
                values.push(from_sql(row.get_ref(i).map_err(|e| e.to_string())?));
            }
            out.push(values);
        }
        Ok(Rows { columns, rows: out })
    }

    fn execute_stmt(&self, sql: &str, params: &[Value]) -> Result<u64, String> {
        plugin_sql::as_plugin(|| {
            let mut stmt = self.prepare(sql)?;
            let params = bind(params)?;
            stmt.execute(rusqlite::params_from_iter(params))
                .map(|n| n as u64)
                .map_err(|e| e.to_string())
        })
    }

    /// Adds to a counter named after the plugin: no plugin may change the
    /// host's counters (`drop_…`, `net_…`) or another plugin's.
    fn add_to_counter(&self, name: &str, n: u64) -> Result<(), String> {
        let own = name
            .strip_prefix(self.plugin)
            .is_some_and(|rest| rest.len() > 1 && rest.starts_with('_'));
        if !own {
            return Err(format!(
                "counter `{name}`: a plugin's counters are named `{}_…`",
                self.plugin
            ));
        }
        let n = i64::try_from(n).map_err(|_| format!("counter `{name}`: {n} is too large"))?;
        counters::add(self.statements.conn(), name, n).map_err(|e| e.to_string())
    }

    fn prune(&self, before_ms: i64, keep: u64) -> Result<Pruned, String> {
        let (expired, excess) = dead_letters::prune(self.statements.conn(), before_ms, keep)
            .map_err(|e| e.to_string())?;
        Ok(Pruned { expired, excess })
    }
}

/// Runs `f`, turning an error or a panic into the ABI's error string. A host
/// bug must not unwind through a plugin's frames.
fn abi_result<T>(f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(_) => RResult::RErr("the host panicked while serving this call".into()),
    }
}

impl HostServices for HostContext<'_, '_> {
    fn query(&mut self, sql: RStr<'_>, params: RSlice<'_, Value>) -> RResult<Rows, RString> {
        abi_result(|| self.query_rows(sql.as_str(), params.as_slice()))
    }

    fn execute(&mut self, sql: RStr<'_>, params: RSlice<'_, Value>) -> RResult<u64, RString> {
        abi_result(|| self.execute_stmt(sql.as_str(), params.as_slice()))
    }

    fn now_ms(&self) -> i64 {
        db::now_ms()
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let (plugin, message) = (self.plugin, message.as_str());
        match level {
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn identity(&self) -> Identity {
        self.identity.clone()
    }

    fn count(&mut self, name: RStr<'_>, n: u64) -> RResult<(), RString> {
        abi_result(|| self.add_to_counter(name.as_str(), n))
    }

    fn prune_dead_letters(&mut self, before_ms: i64, keep: u64) -> RResult<Pruned, RString> {
        abi_result(|| self.prune(before_ms, keep))
    }

    fn create_event(
        &mut self,
        network_id: RStr<'_>,
        event_type: RStr<'_>,
        content: &Value,
        deps: RSlice<'_, u8>,
    ) -> RResult<RVec<u8>, RString> {
        abi_result(|| {
            self.create(
                network_id.as_str(),
                event_type.as_str(),
                content,
                deps.as_slice(),
            )
        })
    }
}

/// SQL parameters borrowed from plugin values.
struct Param<'v>(&'v Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Bool(b) => ValueRef::Integer(*b as i64),
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Float(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b.as_slice()),
            // `bind` rejects the rest before we get here.
            _ => ValueRef::Null,
        }))
    }
}

/// `params` as SQL parameters, or why one cannot be. Checked first and
/// then borrowed, so that binding allocates nothing per statement.
fn bind(params: &[Value]) -> Result<impl Iterator<Item = Param<'_>>, String> {
    let nested = params
        .iter()
        .position(|v| matches!(v, Value::List(_) | Value::Map(_)));
    if let Some(i) = nested {
        return Err(format!(
            "parameter {} is a {}; SQL parameters are null, bool, integer, float, text or bytes",
            i + 1,
            params[i].kind()
        ));
    }
    Ok(params.iter().map(Param))
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).as_ref().into()),
        ValueRef::Blob(b) => Value::Bytes(b.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::plugin_sql::install_authorizer;
    use quiet_plugin_api::{params, Context};
    use rusqlite::Connection;

    #[test]
    fn plugins_query_with_typed_params_and_cannot_touch_the_transaction() {
        let conn = Connection::open_in_memory().unwrap();
        install_authorizer(&conn);
        conn.execute_batch("CREATE TABLE t(a INTEGER, b TEXT, c BLOB); BEGIN")
            .unwrap();
        let id = Identity::default();
        let statements = Statements::new(&conn);
        let mut host = HostContext::new(&statements, "test", &id, None);
        let mut ctx = Context::new(host.as_abi(), Value::EMPTY_MAP);
        ctx.execute(
            "INSERT INTO t VALUES (?, ?, ?)",
            params![1, "x", vec![0u8, 255]],
        )
        .unwrap();
        let rows = ctx.query("SELECT a, b, c FROM t", &[]).unwrap();
        let row = rows.first().unwrap();
        assert_eq!(
            (row.int(0), row.str(1), row.bytes(2)),
            (Some(1), Some("x"), Some(&[0u8, 255][..]))
        );
        assert_eq!(row.named("b").as_str(), Some("x"));

        let err = ctx.execute("  commit", &[]).unwrap_err();
        assert!(
            err.message().contains("COMMIT statements are not allowed"),
            "{err}"
        );
        // Past the first-word check, the authorizer still refuses.
        for sneaky in [
            "/* hi */ COMMIT",
            "-- x\nEND",
            "/**/ SAVEPOINT s",
            "/**/ ATTACH 'x' AS y",
            "/**/ PRAGMA journal_mode = DELETE",
        ] {
            assert!(ctx.execute(sneaky, &[]).is_err(), "{sneaky} was allowed");
        }
        for sneaky in [
            "INSERT OR ROLLBACK INTO t VALUES (1, 'x', NULL)",
            "insert or rollBack into t values (1, 'x', null)",
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT RAISE(ROLLBACK, 'no'); END",
        ] {
            let err = ctx.execute(sneaky, &[]).unwrap_err();
            assert!(err.message().contains("ROLLBACK is not allowed"), "{err}");
        }
        assert_eq!(ctx.query("PRAGMA table_info(t)", &[]).unwrap().len(), 3);
        let err = ctx
            .query("SELECT ?", &[Value::List(RVec::new())])
            .unwrap_err();
        assert!(err.message().contains("parameter 1 is a list"), "{err}");
        assert!(!conn.is_autocommit());
        // The guard judges plugin statements only: the host's own still run.
        conn.execute_batch("SAVEPOINT host; RELEASE host").unwrap();
    }

    #[test]
    fn plugins_write_only_their_own_tables_and_count_through_the_host() {
        let conn = db::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE p_seen(a); BEGIN").unwrap();
        let id = Identity::default();
        let statements = Statements::new(&conn);
        // A host statement this run holds, as the event store's insert is.
        let host_sql = "INSERT INTO counters(name, value) VALUES (?1, ?2)";
        statements
            .get(host_sql, Connection::prepare_cached)
            .unwrap()
            .execute(("drop_bad_seal", 1))
            .unwrap();
        let mut host = HostContext::new(&statements, "p", &id, None);
        let mut ctx = Context::new(host.as_abi(), Value::EMPTY_MAP);
        let err = ctx
            .execute(host_sql, params!["drop_bad_seal", -1])
            .unwrap_err();
        assert_eq!(
            err.message(),
            "plugin SQL may not write the host's table `counters`"
        );
        ctx.execute("INSERT INTO p_seen SELECT value FROM counters", &[])
            .unwrap();

        ctx.count("p_seen", 2).unwrap();
        ctx.count("p_seen", 1).unwrap();
        for other in ["drop_bad_seal", "p_", "px_seen", "sync_seen"] {
            let err = ctx.count(other, 1).unwrap_err();
            assert!(err.message().contains("named `p_…`"), "{other}: {err}");
        }
        let value = |name: &str| -> i64 {
            conn.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!((value("p_seen"), value("drop_bad_seal")), (3, 1));

        for at in [1, 2, 3] {
            conn.execute(
                "INSERT INTO dead_letters(at_ms, handler, reason, envelope) VALUES (?1, 'h', 'r', '{}')",
                [at],
            )
            .unwrap();
        }
        let err = ctx.execute("DELETE FROM dead_letters", &[]).unwrap_err();
        assert!(err.message().contains("`dead_letters`"), "{err}");
        let pruned = ctx.prune_dead_letters(2, 1).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                expired: 1,
                excess: 1
            }
        );
    }
}
