//! Messages: projects decrypted `message` events into a `messages` table
//! that commands and UIs can query.
//!
//! The host's event store is the source of truth: it decrypts, verifies,
//! dedups and stores every event, then routes the decrypted event here as
//!
//! ```text
//! { event_type: "message", event_id: Bytes, network_id: Text,
//!   author: Text, created_ms: Int, event_plaintext: { text } }
//! ```
//!
//! `author` is the peer whose signature the host verified and `created_ms`
//! the time it signed: neither is a field the author wrote, so no member
//! can post as another. Rows projected before events were signed keep the
//! author their sender claimed, with `verified = 0`.
//!
//! The projection is idempotent (`INSERT OR IGNORE` on the unique
//! `(network_id, created_ms, event_id)`, which the event id alone
//! determines), so an event routed twice, or a projection rebuilt from
//! `events`, gives the same rows.
//!
//! That one index is the table's only key, on purpose: a primary key on
//! the event id (random until ids became time-first) put every insert on a
//! random index page, and a commit wrote a whole page per event for it
//! (measured: 6.7 KB of WAL per event with it, 4.9 KB without; a
//! catch-up's receiver spent a third of its SQLite time there).
//! Time-ordered keys fill pages in order.
//!
//! A plaintext missing a field is an error naming it: the host rolls
//! the call back and keeps the envelope in `dead_letters`, where a malformed
//! event is visible instead of silently missing from the conversation.

use quiet_plugin_api::{
    bail, export_plugin, field, params, Context, Envelope, Handler, PluginError, Value,
};

/// The `messages` handler: one row per `message` event.
pub struct Messages;

impl Handler for Messages {
    fn name(&self) -> &str {
        "messages"
    }

    fn event_types(&self) -> &[&str] {
        &["message"]
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        let event_id = required(env.get(field::EVENT_ID), "event_id", Value::as_bytes)?;
        let network_id = required(env.get(field::NETWORK_ID), "network_id", Value::as_str)?;
        let author = required(env.get(field::AUTHOR), "author", Value::as_str)?;
        let created_ms = required(env.get(field::CREATED_MS), "created_ms", Value::as_int)?;
        let text = env.plaintext().and_then(|m| m.get("text"));
        let text = required(text, "event_plaintext.text", Value::as_str)?;
        ctx.execute(
            "INSERT OR IGNORE INTO messages (event_id, network_id, author, text, created_ms, verified) \
             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
            params![event_id, network_id, author, text, created_ms],
        )?;
        Ok(Vec::new())
    }

    /// Before a replay: the host offers every stored message again. Rows
    /// from before signatures stay: their events are not replayed.
    fn reset(&self, ctx: &mut Context<'_>) -> Result<(), PluginError> {
        ctx.execute("DELETE FROM messages WHERE verified = 1", params![])?;
        Ok(())
    }
}

/// The value `read` finds in `value`, or an error naming the missing (or
/// mistyped) field.
fn required<'a, T>(
    value: Option<&'a Value>,
    name: &str,
    read: impl Fn(&'a Value) -> Option<T>,
) -> Result<T, PluginError> {
    match value.and_then(read) {
        Some(v) => Ok(v),
        None => bail!("message event without a valid '{name}'"),
    }
}

export_plugin! {
    name: "messages",
    version: env!("CARGO_PKG_VERSION"),
    migrations: [
        "CREATE TABLE IF NOT EXISTS messages (
            event_id BLOB PRIMARY KEY,
            network_id TEXT NOT NULL,
            author TEXT NOT NULL,
            text TEXT NOT NULL,
            created_ms INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS messages_by_network
            ON messages (network_id, created_ms, event_id);",
        // 2: drop the random-key primary key; see the module docs.
        "CREATE TABLE messages_v2 (
            event_id BLOB NOT NULL,
            network_id TEXT NOT NULL,
            author TEXT NOT NULL,
            text TEXT NOT NULL,
            created_ms INTEGER NOT NULL
         );
         INSERT INTO messages_v2 (event_id, network_id, author, text, created_ms)
            SELECT event_id, network_id, author, text, created_ms FROM messages
            ORDER BY network_id, created_ms, event_id;
         DROP TABLE messages;
         ALTER TABLE messages_v2 RENAME TO messages;
         CREATE UNIQUE INDEX messages_by_network
            ON messages (network_id, created_ms, event_id);",
        // 3: the host's event ids became time-first; its migration kept the
        // old id's first 24 bytes as their tail, which finds each row's new
        // id. (The host's migrations run before any plugin's.)
        "CREATE TEMP TABLE id_map AS SELECT substr(event_id, 9) AS tail, event_id FROM events;
         CREATE INDEX temp.id_map_tail ON id_map (tail);
         UPDATE messages SET event_id = COALESCE(
            (SELECT event_id FROM id_map WHERE tail = substr(messages.event_id, 1, 24)),
            event_id);
         DROP TABLE temp.id_map;",
        // 4: events are signed; rows from before keep their claimed author.
        "ALTER TABLE messages ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;",
    ],
    handlers: [Messages],
}

#[cfg(test)]
mod tests {
    use quiet_host::storage::db;
    use quiet_plugin_api::{envelope, Envelope, Value};
    use quiet_plugin_test_support::TestHost;

    /// A message as the host's event store routes it.
    fn message(id: u8, plaintext: Value) -> Envelope {
        envelope! {
            "event_type" => "message",
            "event_id" => vec![id; 32],
            "network_id" => "net-1",
            "author" => "alice",
            "created_ms" => 1_000,
            "event_plaintext" => plaintext,
        }
    }

    fn plaintext(text: &str) -> Value {
        Value::map([("text", Value::from(text))])
    }

    #[test]
    fn projects_each_message_once() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let hello = message(1, plaintext("hello"));
        host.deliver(vec![hello.clone(), hello, message(2, plaintext("hi"))])
            .unwrap();
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
        assert_eq!(host.count("SELECT COUNT(*) FROM messages"), 2);
        let (author, text, created, verified): (String, String, i64, i64) = host
            .db()
            .query_row(
                "SELECT author, text, created_ms, verified FROM messages WHERE event_id = ?1",
                [vec![1u8; 32]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (author.as_str(), text.as_str(), created, verified),
            ("alice", "hello", 1_000, 1)
        );
    }

    #[test]
    fn the_author_is_the_verified_signer_never_a_field_of_the_content() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        // Content naming another author: the host drops such events, and
        // were one to get here, its field would not be read.
        let claims = Value::map([
            ("text", Value::from("hi")),
            ("author", Value::from("mallory")),
        ]);
        host.deliver(vec![message(4, claims)]).unwrap();
        let author: String = host
            .db()
            .query_row("SELECT author FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(author, "alice");
    }

    #[test]
    fn a_malformed_message_is_a_dead_letter_naming_the_field() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let mut no_author = message(3, plaintext("hi"));
        no_author.remove("author");
        let no_text = message(5, Value::map([("txt", "hi")]));
        host.deliver(vec![no_author, no_text]).unwrap();
        let dead = host.dead_letters();
        assert_eq!(dead.len(), 2);
        assert!(dead[0].1.contains("'author'"), "{dead:?}");
        assert!(dead[1].1.contains("event_plaintext.text"), "{dead:?}");
        assert_eq!(host.count("SELECT COUNT(*) FROM messages"), 0);
    }

    /// A database with the host's schema and the first `applied` of this
    /// plugin's migrations, and a function that applies the rest.
    fn migrated_up_to(applied: usize) -> (rusqlite::Connection, impl Fn(&rusqlite::Connection)) {
        let migrations: Vec<&'static str> = super::plugin_module()
            .migrations()
            .iter()
            .map(|m| m.as_str())
            .collect();
        let conn = db::open_in_memory().unwrap();
        db::apply_plugin_migrations(&conn, "messages", &migrations[..applied]).unwrap();
        let rest = move |conn: &rusqlite::Connection| {
            db::apply_plugin_migrations(conn, "messages", &migrations).unwrap();
        };
        (conn, rest)
    }

    #[test]
    fn an_old_projection_keeps_its_rows_and_stays_unique_after_migrating() {
        let (conn, migrate_rest) = migrated_up_to(1);
        let insert =
            "INSERT OR IGNORE INTO messages (event_id, network_id, author, text, created_ms) \
                      VALUES (x'01', 'net-1', 'alice', 'hello', 1000)";
        assert_eq!(conn.execute(insert, []).unwrap(), 1);

        migrate_rest(&conn);
        let row: (Vec<u8>, String, String) = conn
            .query_row(
                "SELECT event_id, author, text FROM messages WHERE network_id = 'net-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (vec![1], "alice".into(), "hello".into()));
        assert_eq!(
            conn.execute(insert, []).unwrap(),
            0,
            "a duplicate is ignored"
        );
    }

    #[test]
    fn rows_keyed_by_whole_hash_ids_take_their_events_time_first_ids() {
        let (conn, migrate_rest) = migrated_up_to(2);
        // As the host's migration left it: time first, then the old id's
        // first 24 bytes.
        let old_id: Vec<u8> = (0..32).collect();
        let mut new_id = 1000i64.to_be_bytes().to_vec();
        new_id.extend_from_slice(&old_id[..24]);
        conn.execute(
            "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms) \
             VALUES (?1, 'net-1', 1000, 'message', x'00', 0)",
            [&new_id],
        )
        .unwrap();
        let insert = "INSERT INTO messages (event_id, network_id, author, text, created_ms) \
                      VALUES (?1, 'net-1', 'alice', ?2, 1000)";
        conn.execute(insert, (&old_id, "mapped")).unwrap();
        conn.execute(insert, (vec![9u8; 32], "no event")).unwrap();

        migrate_rest(&conn);
        let id = |text: &str| -> Vec<u8> {
            conn.query_row(
                "SELECT event_id FROM messages WHERE text = ?1",
                [text],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(id("mapped"), new_id);
        assert_eq!(
            id("no event"),
            vec![9u8; 32],
            "a row without its event is kept"
        );
    }
}
