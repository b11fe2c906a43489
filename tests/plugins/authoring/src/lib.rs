//! Test-only plugin: a plugin with an event type of its own.
//!
//! Its job creates `authoring_note` events in every network this host is a
//! member of, each after the one before (`deps`), up to `limit` in all;
//! its other handler projects every note it receives, from any host, with
//! the verified author the host routes it with. Nothing in the host knows
//! the type.

use quiet_plugin_api::{
    bail, export_plugin, params, Context, Envelope, EventId, Handler, PluginError, Value,
};

/// Creates notes.
struct Author;

impl Handler for Author {
    fn name(&self) -> &str {
        "authoring"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    /// Creates `per_run` notes (default 1) in each network, until this
    /// host has made `limit` (default 10) in it.
    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let int = |name, default| params.get(name).and_then(Value::as_int).unwrap_or(default);
        let (per_run, limit) = (int("per_run", 1), int("limit", 10));
        let networks = ctx.query(
            "SELECT network_id FROM networks ORDER BY network_id",
            params![],
        )?;
        for network in networks.iter() {
            let Some(network) = network.str(0) else {
                bail!("a network id that is not text");
            };
            let made = ctx.query(
                "SELECT n, last FROM authoring_made WHERE network_id = ?1",
                params![network],
            )?;
            let (mut n, mut last) = match made.first() {
                Some(row) => (
                    row.int(0).unwrap_or(0),
                    row.bytes(1).and_then(EventId::from_bytes),
                ),
                None => (0, None),
            };
            for _ in 0..per_run {
                if n >= limit {
                    break;
                }
                let note = Value::map([("n", Value::from(n)), ("text", Value::from("a note"))]);
                let deps: Vec<EventId> = last.into_iter().collect();
                last = Some(ctx.create_event(network, "authoring_note", &note, &deps)?);
                n += 1;
            }
            ctx.execute(
                "INSERT OR REPLACE INTO authoring_made (network_id, n, last) VALUES (?1, ?2, ?3)",
                params![network, n, last.map(Value::from).unwrap_or(Value::Null)],
            )?;
        }
        if params.get("fail").and_then(Value::as_bool) == Some(true) {
            bail!("failing after creating its notes, as asked");
        }
        Ok(Vec::new())
    }
}

/// Projects notes.
struct Notes;

impl Handler for Notes {
    fn name(&self) -> &str {
        "authoring_notes"
    }

    fn event_types(&self) -> &[&str] {
        &["authoring_note"]
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        let (Some(id), Some(network), Some(author)) =
            (env.event_id(), env.str("network_id"), env.author())
        else {
            bail!("a note without its event id, network or verified author");
        };
        let Some(n) = env
            .plaintext()
            .and_then(|p| p.get("n"))
            .and_then(Value::as_int)
        else {
            bail!("a note without its number");
        };
        let dep = env
            .deps()
            .first()
            .copied()
            .map(Value::from)
            .unwrap_or(Value::Null);
        ctx.execute(
            "INSERT OR IGNORE INTO authoring_notes (event_id, network_id, author, n, dep) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, network, author, n, dep],
        )?;
        Ok(Vec::new())
    }

    fn reset(&self, ctx: &mut Context<'_>) -> Result<(), PluginError> {
        ctx.execute("DELETE FROM authoring_notes", params![])?;
        Ok(())
    }
}

export_plugin! {
    name: "authoring",
    version: env!("CARGO_PKG_VERSION"),
    migrations: [
        "CREATE TABLE authoring_made (network_id TEXT PRIMARY KEY, n INTEGER NOT NULL, last BLOB);
         CREATE TABLE authoring_notes (
            event_id BLOB PRIMARY KEY,
            network_id TEXT NOT NULL,
            author TEXT NOT NULL,
            n INTEGER NOT NULL,
            dep BLOB
         );",
    ],
    handlers: [Author, Notes],
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;
    use quiet_plugin_test_support::TestHost;

    #[test]
    fn notes_created_in_a_job_reach_the_projector_signed_by_this_host() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.db()
            .execute(
                "INSERT INTO networks (network_id, created_ms) VALUES (?1, 0)",
                [TestHost::NETWORK_ID],
            )
            .unwrap();
        let params = Value::map([("per_run", Value::from(3)), ("limit", Value::from(5))]);
        host.run_job("authoring", params.clone()).unwrap();
        host.run_job("authoring", params).unwrap();
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
        assert_eq!(host.count("SELECT COUNT(*) FROM events"), 5);
        assert_eq!(host.count("SELECT COUNT(*) FROM authoring_notes"), 5);
        let me = host.identity().peer_id.to_string();
        let by_me = host.count(&format!(
            "SELECT COUNT(*) FROM authoring_notes WHERE author = '{me}'"
        ));
        assert_eq!(by_me, 5);
        // Each note after the first names the one before.
        assert_eq!(
            host.count(
                "SELECT COUNT(*) FROM authoring_notes a JOIN authoring_notes b ON a.dep = b.event_id \
                 WHERE a.n = b.n + 1"
            ),
            4
        );
    }

    #[test]
    fn the_notes_of_a_job_that_fails_never_existed() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.join_network(TestHost::NETWORK_ID);
        let params = Value::map([("per_run", Value::from(3)), ("fail", Value::from(true))]);
        let err = host.run_job("authoring", params).unwrap_err();
        assert!(err.contains("as asked"), "{err}");
        assert_eq!(host.count("SELECT COUNT(*) FROM events"), 0);
        assert_eq!(host.count("SELECT COUNT(*) FROM authoring_notes"), 0);
    }

    #[test]
    fn a_note_in_a_network_this_host_is_not_in_fails_the_job() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.db()
            .execute(
                "INSERT INTO networks (network_id, created_ms) VALUES ('00000000000000000000000000000001', 0)",
                [],
            )
            .unwrap();
        let err = host
            .run_job("authoring", Value::map([("per_run", Value::from(1))]))
            .unwrap_err();
        assert!(err.contains("not a member"), "{err}");
        assert_eq!(host.count("SELECT COUNT(*) FROM events"), 0);
        assert_eq!(
            host.count("SELECT COUNT(*) FROM authoring_made"),
            0,
            "rolled back"
        );
    }
}
