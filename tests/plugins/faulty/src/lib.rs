//! Test-only plugin: handlers that misbehave on purpose, so that tests can
//! check the host contains them. Each writes to `faulty_writes` before it
//! fails, so a test can check that the write was rolled back.
//!
//! - `panicker` panics while processing a `boom`;
//! - `looper` answers every `loop` with the same envelope, forever, until the
//!   host's hop limit stops it;
//! - `job_panicker` panics in its job;
//! - `failer` returns an error for every `fail`;
//! - `panic_all` panics on every call: its job and every `message`;
//! - `hanger`'s job does not return: it sleeps (`mode: sleep`, the
//!   default), spins (`spin`) or runs an endless query (`sql`), for `ms`
//!   milliseconds or for ever; if it ever comes back it records `hanger woke`
//!   in `faulty_done`. The `fixed` build returns at once, recording
//!   `hanger fixed`;
//! - `flooder`'s job returns `n` envelopes at once, of type `event_type`
//!   (default `flood`) with `seq` from `from` on; `flood_sink` records the
//!   `seq` of each `flood` in `faulty_floods`;
//! - `sql_runner`'s job runs the statement in its `sql` param and fails
//!   with its error: a plugin trying what the host must refuse.
//!
//! Build with `QUIET_TEST_VARIANT=fixed` for a build with another hash and
//! a `hanger` that returns.

use std::time::{Duration, Instant};

use quiet_plugin_api::{
    bail, envelope, export_plugin, params, Context, Envelope, Handler, PluginError, Value,
};

/// Which build of this plugin is running; set at compile time.
const VARIANT: &str = match option_env!("QUIET_TEST_VARIANT") {
    Some(v) => v,
    None => "v1",
};

struct Panicker;

impl Handler for Panicker {
    fn name(&self) -> &str {
        "panicker"
    }

    fn event_types(&self) -> &[&str] {
        &["boom"]
    }

    fn run_job(
        &self,
        _ctx: &mut Context<'_>,
        _params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![envelope! { "event_type" => "boom" }])
    }

    fn process(
        &self,
        _env: &Envelope,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        ctx.execute(
            "INSERT INTO faulty_writes (note) VALUES ('before panic')",
            params![],
        )?;
        panic!("boom handler exploded");
    }
}

struct Looper;

impl Handler for Looper {
    fn name(&self) -> &str {
        "looper"
    }

    fn event_types(&self) -> &[&str] {
        &["loop"]
    }

    fn run_job(
        &self,
        _ctx: &mut Context<'_>,
        _params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![envelope! { "event_type" => "loop" }])
    }

    fn process(
        &self,
        env: &Envelope,
        _ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![env.clone()])
    }
}

struct JobPanicker;

impl Handler for JobPanicker {
    fn name(&self) -> &str {
        "job_panicker"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn run_job(
        &self,
        ctx: &mut Context<'_>,
        _params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        ctx.execute(
            "INSERT INTO faulty_writes (note) VALUES ('job before panic')",
            params![],
        )?;
        panic!("job exploded");
    }
}

struct Failer;

impl Handler for Failer {
    fn name(&self) -> &str {
        "failer"
    }

    fn event_types(&self) -> &[&str] {
        &["fail"]
    }

    fn run_job(
        &self,
        _ctx: &mut Context<'_>,
        _params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![envelope! { "event_type" => "fail", "n" => 1 }])
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        ctx.execute(
            "INSERT INTO faulty_writes (note) VALUES ('before fail')",
            params![],
        )?;
        let n = env.int("n").unwrap_or_default();
        bail!("refusing envelope {n}");
    }
}

struct PanicAll;

impl Handler for PanicAll {
    fn name(&self) -> &str {
        "panic_all"
    }

    fn event_types(&self) -> &[&str] {
        &["message"]
    }

    fn run_job(
        &self,
        _ctx: &mut Context<'_>,
        _params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        panic!("panic_all: job");
    }

    fn process(
        &self,
        _env: &Envelope,
        _ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        panic!("panic_all: message");
    }
}

struct Hanger;

impl Handler for Hanger {
    fn name(&self) -> &str {
        "hanger"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        if VARIANT == "fixed" {
            ctx.execute(
                "INSERT INTO faulty_done (note) VALUES ('hanger fixed')",
                params![],
            )?;
            return Ok(vec![]);
        }
        let until = match params.int_or("ms", -1)? {
            ms if ms < 0 => None,
            ms => Some(Instant::now() + Duration::from_millis(ms as u64)),
        };
        let over = || until.is_some_and(|t| Instant::now() >= t);
        // Tests see from the log that the call is under way.
        ctx.info("hanger started");
        match params.str_or("mode", "sleep")? {
            "sleep" => {
                while !over() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            "spin" => {
                let mut x = 0u64;
                while !over() {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "sql" => {
                // Endless unless interrupted; the error says so.
                ctx.query(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
                    params![],
                )?;
            }
            other => bail!("hanger: unknown mode '{other}'"),
        }
        ctx.execute(
            "INSERT INTO faulty_done (note) VALUES ('hanger woke')",
            params![],
        )?;
        Ok(vec![])
    }
}

struct Flooder;

impl Handler for Flooder {
    fn name(&self) -> &str {
        "flooder"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn run_job(
        &self,
        _ctx: &mut Context<'_>,
        params: &Value,
    ) -> Result<Vec<Envelope>, PluginError> {
        let n = params.int_or("n", 1000)?;
        let from = params.int_or("from", 0)?;
        let event_type = params.str_or("event_type", "flood")?;
        Ok((from..from + n)
            .map(|seq| envelope! { "event_type" => event_type, "seq" => seq })
            .collect())
    }
}

struct FloodSink;

impl Handler for FloodSink {
    fn name(&self) -> &str {
        "flood_sink"
    }

    fn event_types(&self) -> &[&str] {
        &["flood"]
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        ctx.execute(
            "INSERT INTO faulty_floods (seq) VALUES (?)",
            params![env.int("seq")],
        )?;
        Ok(vec![])
    }
}

struct SqlRunner;

impl Handler for SqlRunner {
    fn name(&self) -> &str {
        "sql_runner"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let sql = params.str_or("sql", "")?;
        ctx.execute(sql, params![])?;
        Ok(vec![])
    }
}

export_plugin! {
    name: "faulty",
    version: VARIANT,
    migrations: [
        "CREATE TABLE IF NOT EXISTS faulty_writes (note TEXT NOT NULL)",
        "CREATE TABLE faulty_done (note TEXT NOT NULL);
         CREATE TABLE faulty_floods (seq INTEGER PRIMARY KEY)",
    ],
    handlers: [
        Panicker, Looper, JobPanicker, Failer, PanicAll, Hanger, Flooder, FloodSink, SqlRunner,
    ],
}
