//! Template: a small, complete quiet-host plugin to copy when you write your
//! own. The guide is `plugins/README.md`.
//!
//! The plugin `template` has one handler, `greeter`:
//!
//! - as a job (`run_job`), it emits a `greeting` envelope
//!   `{event_type: "greeting", text, at_ms}`, where `text` is the job's
//!   `text` param (default `"hello"`) and `at_ms` the host's clock;
//! - as a subscriber to `greeting` (`process`), it records each greeting in
//!   its own table, `template_greetings`, and keeps the newest `keep`.
//!
//! Run it every ten seconds, recording only greetings that contain
//! `keyword` and keeping the newest 100, with this in `jobs.yaml`:
//!
//! ```yaml
//! settings:              # per plugin, read by all its handlers
//!   template:
//!     keyword: hello     # optional: record only greetings containing it
//!     keep: 100          # optional, default 1000
//! jobs:
//!   - name: greet
//!     handler: greeter
//!     frequency_ms: 10000
//!     params:            # this job's own
//!       text: hello from the template
//! ```
//!
//! To make it yours, change everything marked `CHANGE:`.

use quiet_plugin_api::{
    bail, envelope, export_plugin, params, Context, Envelope, FilterContext, Handler, PluginError,
    Value,
};

/// The `greeter` handler. A plugin may declare several handlers; each is a
/// type implementing [`Handler`], listed in `export_plugin!` below.
///
/// CHANGE: rename the type, and keep no state in it that must survive a
/// reload: a hot reload makes new handlers, and the old ones' memory is gone.
/// Keep what matters in your tables.
pub struct Greeter;

impl Handler for Greeter {
    /// CHANGE: the name `handler:` refers to in jobs.yaml; unique across all
    /// plugins a host loads.
    fn name(&self) -> &str {
        "greeter"
    }

    /// CHANGE: the `event_type`s `process` is offered; `&["*"]` means all,
    /// `&[]` none (a handler that only runs jobs).
    fn event_types(&self) -> &[&str] {
        &["greeting"]
    }

    /// A cheap look at the envelope before `process`, with no database
    /// access; `false` skips it. Outgoing envelopes are for the network: this
    /// handler never processes them. (The host already sends `is_outgoing`
    /// envelopes out before any handler sees them; the check is a safeguard.)
    ///
    /// `ctx.settings()` is the plugin's `settings:` map in jobs.yaml (empty
    /// if none); an edit applies from the next envelope. A filter cannot
    /// fail, so a `keyword` that is not text lets everything through, and
    /// `process` says what is wrong with it.
    fn filter(&self, env: &Envelope, ctx: &FilterContext<'_>) -> bool {
        let wanted = match ctx.settings().get("keyword") {
            Some(Value::Text(keyword)) => env.str("text").is_some_and(|t| t.contains(&**keyword)),
            _ => true,
        };
        wanted && !env.is_outgoing()
    }

    /// Records one greeting. Runs inside the host's transaction: if this
    /// returns an error (or panics), what it wrote is rolled back and the
    /// envelope goes to the `dead_letters` table with the message.
    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        let Some(text) = env.str("text") else {
            bail!("a greeting needs a text field 'text'");
        };
        // Settings, like params, fail the call with a message naming the key
        // when they have the wrong type.
        ctx.settings().str_or("keyword", "")?;
        let keep = ctx.settings().int_or("keep", 1000)?;
        if keep < 1 {
            bail!("setting 'keep' must be at least 1, got {keep}");
        }
        // A greeting from elsewhere may come without a time: record it now.
        let at_ms = env.int("at_ms").unwrap_or_else(|| ctx.now_ms());
        ctx.execute(
            "INSERT INTO template_greetings (text, at_ms) VALUES (?1, ?2)",
            params![text, at_ms],
        )?;
        ctx.execute(
            "DELETE FROM template_greetings WHERE id <= (SELECT MAX(id) FROM template_greetings) - ?1",
            params![keep],
        )?;
        ctx.debug(&format!("recorded greeting {text:?}"));
        // Envelopes returned here go back into the pipeline, to whichever
        // handlers subscribe to their event_type. This one returns none.
        Ok(Vec::new())
    }

    /// The job: what the scheduler calls every `frequency_ms` when a job in
    /// jobs.yaml names this handler. `params` is the job's `params` map.
    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        // `str_or`/`int_or` give the default when the param is missing and an
        // error naming the param when it has the wrong type.
        let text = params.str_or("text", "hello")?;
        Ok(vec![envelope! {
            "event_type" => "greeting",
            "text" => text,
            "at_ms" => ctx.now_ms(),
        }])
    }
}

export_plugin! {
    // CHANGE: the plugin's name, unique among the plugins a host loads. The
    // host counts applied migrations per plugin name.
    name: "template",
    version: env!("CARGO_PKG_VERSION"),
    // CHANGE: your tables, prefixed with your plugin's name. Append-only:
    // never edit or reorder a migration that has run somewhere; add a new one.
    migrations: [
        "CREATE TABLE IF NOT EXISTS template_greetings (id INTEGER PRIMARY KEY, text TEXT NOT NULL, at_ms INTEGER NOT NULL)",
    ],
    // CHANGE: your handlers, in the order the host should offer envelopes.
    handlers: [Greeter],
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::{envelope, Value};
    use quiet_plugin_test_support::TestHost;

    #[test]
    fn the_jobs_greeting_is_recorded() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.run_job("greeter", Value::map([("text", "hi there")]))
            .unwrap();
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
        let text: String = host
            .db()
            .query_row("SELECT text FROM template_greetings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(text, "hi there");

        // Without the param, the default text.
        host.run_job("greeter", Value::map([("unrelated", 1)]))
            .unwrap();
        assert_eq!(
            host.count("SELECT COUNT(*) FROM template_greetings WHERE text = 'hello'"),
            1
        );
    }

    #[test]
    fn a_non_text_param_fails_the_job_naming_the_param() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let err = host
            .run_job("greeter", Value::map([("text", 42)]))
            .unwrap_err();
        assert_eq!(err, "param 'text' must be text, got integer");
        assert_eq!(host.count("SELECT COUNT(*) FROM template_greetings"), 0);
    }

    #[test]
    fn a_greeting_without_text_is_a_dead_letter_and_writes_nothing() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        host.deliver(vec![
            envelope! { "event_type" => "greeting", "at_ms" => 1 },
            envelope! { "event_type" => "greeting", "text" => "still here", "at_ms" => 2 },
        ])
        .unwrap();
        // The bad one is kept with the handler and the reason; the pipeline
        // went on with the good one.
        assert_eq!(
            host.dead_letters(),
            [(
                "greeter".to_string(),
                "a greeting needs a text field 'text'".to_string()
            )]
        );
        assert_eq!(host.count("SELECT COUNT(*) FROM template_greetings"), 1);
    }

    #[test]
    fn settings_choose_which_greetings_are_kept_and_how_many() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        let greeting = |text: &str| envelope! { "event_type" => "greeting", "text" => text };
        let texts = |host: &TestHost| -> Vec<String> {
            let mut stmt = host
                .db()
                .prepare("SELECT text FROM template_greetings ORDER BY id")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        host.set_settings(Value::map([
            ("keyword", Value::from("apple")),
            ("keep", 2.into()),
        ]));
        host.deliver(
            ["an apple", "a pear", "apple pie", "apple tart"]
                .map(greeting)
                .into(),
        )
        .unwrap();
        assert_eq!(texts(&host), ["apple pie", "apple tart"]);
        // The job's greetings pass the same filter.
        host.run_job("greeter", Value::map([("text", "a pear")]))
            .unwrap();
        assert_eq!(texts(&host), ["apple pie", "apple tart"]);

        // A setting of the wrong type is a dead letter naming it.
        host.set_settings(Value::map([("keep", "many")]));
        host.deliver(vec![greeting("a pear")]).unwrap();
        assert_eq!(
            host.dead_letters(),
            [(
                "greeter".to_string(),
                "param 'keep' must be an integer, got text".to_string()
            )]
        );
        assert_eq!(texts(&host), ["apple pie", "apple tart"]);
    }

    #[test]
    fn a_failing_call_has_its_writes_rolled_back() {
        let mut host = TestHost::new(super::plugin_module()).unwrap();
        // Arrange a failure *after* the handler's INSERT has written its row:
        // RAISE(FAIL) fails the statement but keeps the row it inserted, so
        // only the host's rollback of the whole call can remove it.
        host.db()
            .execute_batch(
                "CREATE TRIGGER refuse_boom AFTER INSERT ON template_greetings
                 WHEN NEW.text = 'boom' BEGIN SELECT RAISE(FAIL, 'no booms'); END",
            )
            .unwrap();
        host.deliver(vec![
            envelope! { "event_type" => "greeting", "text" => "boom" },
        ])
        .unwrap();
        let dead = host.dead_letters();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].1.contains("no booms"), "{dead:?}");
        assert_eq!(host.count("SELECT COUNT(*) FROM template_greetings"), 0);
    }
}

// Compiles (and runs) the Rust examples of plugins/README.md as doctests of
// this crate, so the guide stays true. (The guide also quotes this file's
// `export_plugin!` and tests: keep them in step.) You may delete it in your
// own plugin.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct GuideExamples;
