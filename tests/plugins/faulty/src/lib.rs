//! Test-only plugin: handlers that misbehave on purpose, so that tests can
//! check the host contains them. Each writes to `faulty_writes` before it
//! fails, so a test can check that the write was rolled back.
//!
//! - `panicker` panics while processing a `boom`;
//! - `looper` answers every `loop` with the same envelope, forever, until the
//!   host's hop limit stops it;
//! - `job_panicker` panics in its job;
//! - `failer` returns an error for every `fail`.

use quiet_plugin_api::{
    bail, envelope, export_plugin, params, Context, Envelope, Handler, PluginError, Value,
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

export_plugin! {
    name: "faulty",
    version: env!("CARGO_PKG_VERSION"),
    migrations: ["CREATE TABLE IF NOT EXISTS faulty_writes (note TEXT NOT NULL)"],
    handlers: [Panicker, Looper, JobPanicker, Failer],
}
