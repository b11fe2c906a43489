//! Test-only plugin: a counter whose job emits `tick` envelopes with
//! consecutive sequence numbers and whose handler records each tick it
//! processes, with the variant that processed it.
//!
//! Build it with `QUIET_TEST_VARIANT=v2` (or any other text) to get a
//! distinguishable build for hot-reload tests; the variant is the plugin's
//! version and is written into every `ticks` row. A tick delivered twice
//! fails on the `ticks` primary key instead of passing silently.

use quiet_plugin_api::{
    bail, envelope, export_plugin, params, Context, Envelope, Handler, PluginError, Value,
};

/// Which build of this plugin is running; set at compile time.
const VARIANT: &str = match option_env!("QUIET_TEST_VARIANT") {
    Some(v) => v,
    None => "v1",
};

struct Ticker;

impl Handler for Ticker {
    fn name(&self) -> &str {
        "ticker"
    }

    fn event_types(&self) -> &[&str] {
        &["tick"]
    }

    /// Emits `burst` (default 1) ticks with the next sequence numbers.
    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let burst = match params.get("burst") {
            None | Some(Value::Null) => 1,
            Some(Value::Int(n)) if *n >= 0 => *n,
            Some(other) => {
                bail!("ticker: param 'burst' must be a non-negative integer, got {other:?}")
            }
        };
        ctx.execute(
            "INSERT OR IGNORE INTO ticker_state (id, next_seq) VALUES (0, 1)",
            params![],
        )?;
        let rows = ctx.query("SELECT next_seq FROM ticker_state WHERE id = 0", params![])?;
        let Some(first) = rows.first().and_then(|row| row.int(0)) else {
            bail!("ticker: ticker_state has no integer next_seq");
        };
        ctx.execute(
            "UPDATE ticker_state SET next_seq = next_seq + ?1 WHERE id = 0",
            params![burst],
        )?;
        Ok((first..first + burst)
            .map(|seq| envelope! { "event_type" => "tick", "seq" => seq })
            .collect())
    }

    /// Records the tick; a plain INSERT, so a duplicate delivery fails.
    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        let Some(seq) = env.int("seq") else {
            bail!("ticker: tick without an integer seq");
        };
        let now = ctx.now_ms();
        ctx.execute(
            "INSERT INTO ticks (seq, variant, handled_at_ms) VALUES (?1, ?2, ?3)",
            params![seq, VARIANT, now],
        )?;
        Ok(Vec::new())
    }
}

export_plugin! {
    name: "ticker",
    version: VARIANT,
    migrations: [
        "CREATE TABLE IF NOT EXISTS ticker_state (id INTEGER PRIMARY KEY CHECK (id = 0), next_seq INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS ticks (seq INTEGER PRIMARY KEY, variant TEXT NOT NULL, handled_at_ms INTEGER NOT NULL)",
    ],
    handlers: [Ticker],
}
