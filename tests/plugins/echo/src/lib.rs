//! Test and benchmark plugin: answers each incoming `ping` with a `pong`
//! that carries the ping's `request_id`, `seq` and `payload` back.
//!
//! It never touches the context, so a benchmark calling it through the ABI
//! and calling [`Echo`] directly measures only the cost of the boundary.

use quiet_plugin_api::{
    envelope, export_plugin, Context, Envelope, FilterContext, Handler, PluginError,
};

/// The `echo` handler; public so that benchmarks can call it directly.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn event_types(&self) -> &[&str] {
        &["ping"]
    }

    fn filter(&self, env: &Envelope, _ctx: &FilterContext<'_>) -> bool {
        !env.is_outgoing()
    }

    fn process(
        &self,
        env: &Envelope,
        _ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![envelope! {
            "event_type" => "pong",
            "in_response_to" => env.str("request_id"),
            "seq" => env.int("seq"),
            "payload" => env.bytes("payload"),
        }])
    }
}

export_plugin! {
    name: "echo",
    version: env!("CARGO_PKG_VERSION"),
    handlers: [Echo],
}
