//! Messages: projects decrypted `message` events into a `messages` table
//! that commands and UIs can query.
//!
//! The host's event store is the source of truth: it verifies, decrypts,
//! dedups and stores every event, then routes the decrypted event here as
//!
//! ```text
//! { event_type: "message", event_id: Bytes, network_id: Text,
//!   event_plaintext: { type: "message", text, author, created_ms } }
//! ```
//!
//! The projection is idempotent (`INSERT OR IGNORE` on the event id), so an
//! event routed twice, or a projection rebuilt from `events`, gives the same
//! rows. A plaintext missing a field is an error naming it: the host rolls
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
        let message = env.plaintext();
        let field = |name| message.and_then(|m| m.get(name));
        let text = required(field("text"), "event_plaintext.text", Value::as_str)?;
        let author = required(field("author"), "event_plaintext.author", Value::as_str)?;
        let created_ms = required(
            field("created_ms"),
            "event_plaintext.created_ms",
            Value::as_int,
        )?;
        ctx.execute(
            "INSERT OR IGNORE INTO messages (event_id, network_id, author, text, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![event_id, network_id, author, text, created_ms],
        )?;
        Ok(Vec::new())
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
    ],
    handlers: [Messages],
}

#[cfg(test)]
mod tests {
    use quiet_host::testing::TestHost;
    use quiet_plugin_api::{envelope, Envelope, Value};

    fn message(id: u8, plaintext: Value) -> Envelope {
        envelope! {
            "event_type" => "message",
            "event_id" => vec![id; 32],
            "network_id" => "net-1",
            "event_plaintext" => plaintext,
        }
    }

    fn plaintext(text: &str) -> Value {
        Value::map([
            ("type", Value::from("message")),
            ("text", Value::from(text)),
            ("author", Value::from("alice")),
            ("created_ms", Value::from(1_000)),
        ])
    }

    #[test]
    fn projects_each_message_once() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let hello = message(1, plaintext("hello"));
        host.deliver(vec![hello.clone(), hello, message(2, plaintext("hi"))])
            .unwrap();
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
        assert_eq!(host.count("SELECT COUNT(*) FROM messages"), 2);
        let (author, text, created): (String, String, i64) = host
            .db()
            .query_row(
                "SELECT author, text, created_ms FROM messages WHERE event_id = ?1",
                [vec![1u8; 32]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (author.as_str(), text.as_str(), created),
            ("alice", "hello", 1_000)
        );
    }

    #[test]
    fn a_malformed_message_is_a_dead_letter_naming_the_field() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let no_author = Value::map([("type", "message"), ("text", "hi")]);
        host.deliver(vec![message(3, no_author)]).unwrap();
        let dead = host.dead_letters();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.contains("event_plaintext.author"), "{dead:?}");
        assert_eq!(host.count("SELECT COUNT(*) FROM messages"), 0);
    }
}
