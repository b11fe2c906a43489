//! Reactions: an emoji on a message, as an event type a plugin adds.
//!
//! A `reaction` event's content is `{emoji}`, and its one dep is the
//! message it reacts to. The host routes a reaction only after its message
//! (deps), with its verified author; this plugin projects it into
//! `reactions`, one row per author, message and emoji, which `quiet-host
//! message list` shows under each message.
//!
//! Reactions are made with `quiet-host event send NETWORK reaction
//! '{"emoji": "👍"}' --dep MESSAGE_ID`, or by another plugin, which returns
//! a transient `react` envelope `{network_id, message_id, emoji}`: this
//! plugin turns it into a signed `reaction` with `Context::create_event`.
//!
//! Short on purpose: the plugin author guide (plugins/README.md) walks
//! through it.

use quiet_plugin_api::{
    bail, export_plugin, field, params, Context, Envelope, EventId, Handler, PluginError, Value,
};

/// The most characters of an emoji (a flag, a family with skin tones).
pub const MAX_EMOJI_CHARS: usize = 16;

/// Projects `reaction`s, and makes them from `react` requests.
pub struct Reactions;

impl Handler for Reactions {
    fn name(&self) -> &str {
        "reactions"
    }

    fn event_types(&self) -> &[&str] {
        &["reaction", "react"]
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        match env.event_type() {
            Some("react") => react(env, ctx),
            _ => project(env, ctx),
        }
        .map(|()| Vec::new())
    }

    /// Before a replay, which offers every stored reaction again.
    fn reset(&self, ctx: &mut Context<'_>) -> Result<(), PluginError> {
        ctx.execute("DELETE FROM reactions", params![])?;
        Ok(())
    }
}

/// A stored `reaction`, into `reactions`.
fn project(env: &Envelope, ctx: &mut Context<'_>) -> Result<(), PluginError> {
    let (Some(id), Some(network_id), Some(author), Some(created_ms)) = (
        env.event_id(),
        env.str(field::NETWORK_ID),
        env.author(),
        env.created_ms(),
    ) else {
        bail!("a reaction without its id, network, author or time");
    };
    let emoji = emoji(env.plaintext().and_then(|c| c.get("emoji")))?;
    let [message] = env.deps()[..] else {
        bail!("a reaction depends on exactly one message");
    };
    // Its dep has been routed, so it is stored: is it a message?
    let of = ctx.query(
        "SELECT event_type FROM events WHERE event_id = ?1",
        params![message],
    )?;
    match of.first().and_then(|r| r.str(0)) {
        Some("message") => {}
        other => bail!(
            "a reaction to a {} event, not a message",
            other.unwrap_or("missing")
        ),
    }
    ctx.execute(
        "INSERT OR IGNORE INTO reactions (network_id, message_id, author, emoji, event_id, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![network_id, message, author, emoji, id, created_ms],
    )?;
    Ok(())
}

/// A `react` request from another plugin: a signed `reaction` by this host.
fn react(env: &Envelope, ctx: &mut Context<'_>) -> Result<(), PluginError> {
    let Some(network_id) = env.str(field::NETWORK_ID) else {
        bail!("react: no network_id");
    };
    let Some(message) = env.bytes("message_id").and_then(EventId::from_bytes) else {
        bail!("react: message_id is not a 32-byte event id");
    };
    let emoji = emoji(env.get("emoji"))?;
    let content = Value::map([("emoji", Value::from(emoji))]);
    ctx.create_event(network_id, "reaction", &content, &[message])?;
    Ok(())
}

/// An emoji as a reaction may carry one: 1 to [`MAX_EMOJI_CHARS`]
/// characters, none of them control characters (it is printed).
fn emoji(value: Option<&Value>) -> Result<&str, PluginError> {
    let Some(emoji) = value.and_then(Value::as_str) else {
        bail!("a reaction without an emoji");
    };
    let chars = emoji.chars().count();
    if chars == 0 || chars > MAX_EMOJI_CHARS || emoji.chars().any(char::is_control) {
        bail!("an emoji is 1 to {MAX_EMOJI_CHARS} characters, none of them control characters");
    }
    Ok(emoji)
}

export_plugin! {
    name: "reactions",
    version: env!("CARGO_PKG_VERSION"),
    migrations: [
        // One reaction per author, message and emoji: reacting twice with
        // the same emoji is one reaction.
        "CREATE TABLE reactions (
            network_id TEXT NOT NULL,
            message_id BLOB NOT NULL,
            author TEXT NOT NULL,
            emoji TEXT NOT NULL,
            event_id BLOB NOT NULL,
            created_ms INTEGER NOT NULL,
            UNIQUE (network_id, message_id, author, emoji)
         );",
    ],
    handlers: [Reactions],
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::{envelope, Envelope, Value};
    use quiet_plugin_test_support::TestHost;

    const NET: &str = TestHost::NETWORK_ID;

    /// A stored event of `event_type` with id `[id; 32]`, as the host routes it.
    fn stored(
        host: &TestHost,
        event_type: &str,
        id: u8,
        deps: Vec<Value>,
        content: Value,
    ) -> Envelope {
        host.db()
            .execute(
                "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms, routed) \
                 VALUES (?1, ?2, 1, ?3, x'00', 0, ?4)",
                rusqlite_params(id, event_type),
            )
            .unwrap();
        envelope! {
            "event_type" => event_type,
            "event_id" => vec![id; 32],
            "network_id" => NET,
            "author" => "alice",
            "created_ms" => 1_000,
            "deps" => deps,
            "event_plaintext" => content,
        }
    }

    fn rusqlite_params(id: u8, event_type: &str) -> (Vec<u8>, &'static str, String, i64) {
        (vec![id; 32], NET, event_type.to_owned(), i64::from(id))
    }

    fn reaction(emoji: &str) -> Value {
        Value::map([("emoji", Value::from(emoji))])
    }

    #[test]
    fn a_reaction_to_a_message_is_projected_once_per_author_and_emoji() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let message = stored(&host, "message", 1, vec![], Value::map([("text", "hi")]));
        let like = stored(
            &host,
            "reaction",
            2,
            vec![Value::from(vec![1u8; 32])],
            reaction("👍"),
        );
        let again = stored(
            &host,
            "reaction",
            3,
            vec![Value::from(vec![1u8; 32])],
            reaction("👍"),
        );
        host.deliver(vec![message, like, again]).unwrap();
        // The message has no subscriber here: that one dead letter only.
        let dead = host.dead_letters();
        assert!(
            dead.iter()
                .all(|(_, why)| why.contains("no loaded handler")),
            "{dead:?}"
        );
        assert_eq!(host.count("SELECT COUNT(*) FROM reactions"), 1);
    }

    #[test]
    fn bad_reactions_are_dead_letters_that_say_why() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let dep = |id: u8| vec![Value::from(vec![id; 32])];
        stored(&host, "message", 1, vec![], Value::map([("text", "hi")]));
        stored(&host, "note", 2, vec![], Value::map([("text", "x")]));
        let cases = [
            stored(&host, "reaction", 3, dep(2), reaction("👍")),
            stored(&host, "reaction", 4, vec![], reaction("👍")),
            stored(&host, "reaction", 5, dep(1), reaction("")),
            stored(&host, "reaction", 6, dep(1), reaction("\u{1b}[2J")),
            stored(&host, "reaction", 7, dep(1), reaction(&"x".repeat(17))),
        ];
        host.deliver(cases.to_vec()).unwrap();
        let reasons: Vec<String> = host.dead_letters().into_iter().map(|(_, r)| r).collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert!(
            reasons[0].contains("a reaction to a note event"),
            "{reasons:?}"
        );
        assert!(reasons[1].contains("exactly one message"), "{reasons:?}");
        for r in &reasons[2..] {
            assert!(r.contains("1 to 16 characters"), "{r}");
        }
        assert_eq!(host.count("SELECT COUNT(*) FROM reactions"), 0);
    }

    #[test]
    fn a_react_request_becomes_a_signed_reaction_by_this_host() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.join_network(NET);
        // The message, stored and routed as the host would have.
        let message = stored(&host, "message", 1, vec![], Value::map([("text", "hi")]));
        host.deliver(vec![message]).unwrap();
        let react = envelope! {
            "event_type" => "react",
            "network_id" => NET,
            "message_id" => vec![1u8; 32],
            "emoji" => "🎉",
        };
        host.deliver(vec![react]).unwrap();
        let me = host.identity().peer_id.to_string();
        let (author, emoji): (String, String) = host
            .db()
            .query_row("SELECT author, emoji FROM reactions", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((author, emoji), (me, "🎉".to_owned()));
        assert_eq!(
            host.count("SELECT COUNT(*) FROM events WHERE event_type = 'reaction'"),
            1
        );
    }
}
