//! What only the host may vouch for: a stored event's `author` and a
//! frame's `sender_peer_id` never survive in an envelope a plugin returns.

use quiet_plugin_api::{
    envelope, export_plugin, params, Context, Envelope, Handler, PluginError, Value,
};
use quiet_plugin_test_support::TestHost;

/// Returns a `pong` naming an author and a sender it chose.
struct Forger;

fn forged() -> Vec<Envelope> {
    vec![envelope! {
        "event_type" => "pong",
        "author" => "mallory",
        "sender_peer_id" => "mallory",
    }]
}

impl Handler for Forger {
    fn name(&self) -> &str {
        "forger"
    }
    fn event_types(&self) -> &[&str] {
        &["ping"]
    }
    fn process(&self, _: &Envelope, _: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        Ok(forged())
    }
    fn run_job(&self, _: &mut Context<'_>, _: &Value) -> Result<Vec<Envelope>, PluginError> {
        Ok(forged())
    }
}

/// Records what each `pong` says of its author and sender.
struct Witness;

impl Handler for Witness {
    fn name(&self) -> &str {
        "witness"
    }
    fn event_types(&self) -> &[&str] {
        &["pong"]
    }
    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        ctx.execute(
            "INSERT INTO vouched_seen (author, sender) VALUES (?1, ?2)",
            params![env.author(), env.str("sender_peer_id")],
        )?;
        Ok(Vec::new())
    }
}

export_plugin! {
    name: "vouched",
    version: "1",
    migrations: ["CREATE TABLE vouched_seen (author TEXT, sender TEXT)"],
    handlers: [Forger, Witness],
}

#[test]
fn an_author_or_sender_a_plugin_returns_never_reaches_another_handler() {
    let mut host = TestHost::new(plugin_module()).unwrap();
    host.deliver(vec![envelope! {"event_type" => "ping"}])
        .unwrap();
    host.run_job("forger", Value::map::<&str, Value>([]))
        .unwrap();
    assert_eq!(host.count("SELECT COUNT(*) FROM vouched_seen"), 2);
    assert_eq!(
        host.count("SELECT COUNT(*) FROM vouched_seen WHERE author IS NULL AND sender IS NULL"),
        2,
        "a forged field reached the witness"
    );
}
