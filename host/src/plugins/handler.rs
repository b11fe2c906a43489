//! [`LoadedHandler`]: the host's view of one handler inside a loaded plugin.
//!
//! It turns the ABI's `RResult`s into Rust results and remembers what the
//! handler subscribed to, so the pipeline can skip handlers without crossing
//! the boundary. Panics were already caught on the plugin side (see
//! `quiet_plugin_api::handler`); here they arrive as errors that start with
//! `panicked:`.
//!
//! Every call is timed against the engine's call budget (see
//! [`crate::plugins::call_budget`]): a call the watchdog gave up on comes back
//! as [`CallError::Sql`], so that the caller abandons its unit of work without
//! writing anything more.

use std::{path::PathBuf, sync::Arc};

use quiet_plugin_api::{abi_stable::std_types::RVec, Envelope, HandlerBox, Value, ANY_EVENT_TYPE};

use crate::plugins::{
    call_budget::{self, CallKind, CallSite},
    context::HostContext,
};

/// A handler from a loaded plugin generation.
pub struct LoadedHandler {
    /// The plugin that provides it.
    pub plugin: Arc<str>,
    /// The name `jobs.yaml` refers to.
    pub name: String,
    /// The event types it subscribed to.
    pub event_types: Vec<String>,
    site: Arc<CallSite>,
    abi: HandlerBox,
}

impl LoadedHandler {
    /// `file` and `hash` name the build, for reports about its calls.
    pub(crate) fn new(
        plugin: Arc<str>,
        file: PathBuf,
        hash: String,
        abi: HandlerBox,
    ) -> Result<Self, String> {
        let spec = abi
            .spec()
            .into_result()
            .map_err(|e| format!("handler spec failed: {e}"))?;
        let name = spec.name.into_string();
        Ok(Self {
            site: Arc::new(CallSite {
                plugin: plugin.clone(),
                handler: name.clone(),
                file,
                hash,
            }),
            plugin,
            name,
            event_types: spec
                .event_types
                .into_iter()
                .map(|t| t.into_string())
                .collect(),
            abi,
        })
    }

    /// The handler and build its calls go to.
    pub fn site(&self) -> &CallSite {
        &self.site
    }

    /// Whether the handler subscribes to every event type.
    pub fn subscribes_to_all(&self) -> bool {
        self.event_types.iter().any(|t| t == ANY_EVENT_TYPE)
    }

    /// The handler's `filter`, with its plugin's `settings`.
    pub fn filter(&self, envelope: &Envelope, settings: &Value) -> Result<bool, CallError> {
        call_budget::timed(&self.site, CallKind::Filter, || {
            self.abi.filter(envelope, settings)
        })?
        .into_result()
        .map_err(|e| CallError::Handler(e.into()))
    }

    /// The handler's `process`, inside the caller's transaction, with its
    /// plugin's `settings`.
    pub fn process(
        &self,
        envelope: &Envelope,
        ctx: &mut HostContext<'_, '_>,
        settings: &Value,
    ) -> Result<RVec<Envelope>, CallError> {
        call_budget::timed(&self.site, CallKind::Process, || {
            self.abi.process(envelope, ctx.as_abi(), settings)
        })?
        .into_result()
        .map_err(|e| CallError::Handler(e.into()))
    }

    /// The handler's `run_job`, inside the caller's transaction, with the
    /// job's `params` and its plugin's `settings`.
    pub fn run_job(
        &self,
        ctx: &mut HostContext<'_, '_>,
        params: &Value,
        settings: &Value,
    ) -> Result<RVec<Envelope>, CallError> {
        call_budget::timed(&self.site, CallKind::RunJob, || {
            self.abi.run_job(ctx.as_abi(), params, settings)
        })?
        .into_result()
        .map_err(|e| CallError::Handler(e.into()))
    }

    /// The handler's `reset`, inside the caller's transaction, with its
    /// plugin's `settings`.
    pub fn reset(&self, ctx: &mut HostContext<'_, '_>, settings: &Value) -> Result<(), CallError> {
        call_budget::timed(&self.site, CallKind::Reset, || {
            self.abi.reset(ctx.as_abi(), settings)
        })?
        .into_result()
        .map_err(|e| CallError::Handler(e.into()))
    }
}

/// Why a handler call produced nothing: the handler failed (its savepoint is
/// rolled back and the host carries on), or the database did, or the
/// watchdog gave up on the call (the whole unit of work is abandoned).
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
