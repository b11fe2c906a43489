//! [`LoadedHandler`]: the host's view of one handler inside a loaded plugin.
//!
//! It turns the ABI's `RResult`s into Rust results and remembers what the
//! handler subscribed to, so the pipeline can skip handlers without crossing
//! the boundary. Panics were already caught on the plugin side (see
//! `quiet_plugin_api::handler`); here they arrive as errors that start with
//! `panicked:`.

use std::sync::Arc;

use quiet_plugin_api::{abi_stable::std_types::RVec, Envelope, HandlerBox, Value, ANY_EVENT_TYPE};

use crate::context::HostContext;

/// A handler from a loaded plugin generation.
pub struct LoadedHandler {
    /// The plugin that provides it.
    pub plugin: Arc<str>,
    /// The name `jobs.yaml` refers to.
    pub name: String,
    /// The event types it subscribed to.
    pub event_types: Vec<String>,
    abi: HandlerBox,
}

impl LoadedHandler {
    pub(crate) fn new(plugin: Arc<str>, abi: HandlerBox) -> Result<Self, String> {
        let spec = abi
            .spec()
            .into_result()
            .map_err(|e| format!("handler spec failed: {e}"))?;
        Ok(Self {
            plugin,
            name: spec.name.into_string(),
            event_types: spec
                .event_types
                .into_iter()
                .map(|t| t.into_string())
                .collect(),
            abi,
        })
    }

    /// Whether the handler subscribes to every event type.
    pub fn subscribes_to_all(&self) -> bool {
        self.event_types.iter().any(|t| t == ANY_EVENT_TYPE)
    }

    /// The handler's `filter`.
    pub fn filter(&self, envelope: &Envelope) -> Result<bool, String> {
        self.abi.filter(envelope).into_result().map_err(Into::into)
    }

    /// The handler's `process`, inside the caller's transaction.
    pub fn process(
        &self,
        envelope: &Envelope,
        ctx: &mut HostContext<'_>,
    ) -> Result<RVec<Envelope>, String> {
        self.abi
            .process(envelope, ctx.as_abi())
            .into_result()
            .map_err(Into::into)
    }

    /// The handler's `run_job`, inside the caller's transaction.
    pub fn run_job(
        &self,
        ctx: &mut HostContext<'_>,
        params: &Value,
    ) -> Result<RVec<Envelope>, String> {
        self.abi
            .run_job(ctx.as_abi(), params)
            .into_result()
            .map_err(Into::into)
    }
}

/// Why a handler call produced nothing: the handler failed (its savepoint is
/// rolled back and the host carries on), or the database did (the whole unit
/// of work is abandoned).
#[derive(Debug)]
pub enum CallError {
    /// The handler returned an error or panicked.
    Handler(String),
    /// SQLite failed underneath the host.
    Sql(rusqlite::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Handler(e) => f.write_str(e),
            CallError::Sql(e) => write!(f, "database error: {e}"),
        }
    }
}

impl From<rusqlite::Error> for CallError {
    fn from(e: rusqlite::Error) -> Self {
        CallError::Sql(e)
    }
}
