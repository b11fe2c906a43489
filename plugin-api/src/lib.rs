//! The interface between `quiet-host` and its plugins.
//!
//! A plugin is a `cdylib` that exports one root module with
//! [`export_plugin!`]. The module names the plugin, lists SQL migrations for
//! the plugin's own tables, and makes its [`Handler`]s. The host loads it with
//! abi_stable, which checks at load time that both sides agree on the layout
//! of every type that crosses the boundary.
//!
//! A handler, as in the seed design:
//!
//! ```
//! use quiet_plugin_api::{
//!     envelope, params, Context, Envelope, FilterContext, Handler, PluginError, Value,
//! };
//!
//! struct Sync;
//!
//! impl Handler for Sync {
//!     fn name(&self) -> &str { "sync" }
//!     fn event_types(&self) -> &[&str] { &["sync_request"] }
//!
//!     fn filter(&self, env: &Envelope, _ctx: &FilterContext<'_>) -> bool {
//!         env.plaintext().is_some() && !env.is_outgoing()
//!     }
//!
//!     fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
//!         let network_id = params.get("network_id").and_then(Value::as_str).unwrap_or("");
//!         let peers = ctx.query(
//!             "SELECT peer_id, ip, port FROM addresses WHERE network_id = ? AND is_active",
//!             params![network_id],
//!         )?;
//!         Ok(peers.iter().map(|p| envelope! {
//!             "event_type" => "sync_request",
//!             "seal_to" => p.get(0),
//!             "is_outgoing" => true,
//!             "dest_ip" => p.get(1),
//!             "dest_port" => p.get(2),
//!             "network_id" => network_id,
//!             "event_plaintext" => Value::map([("type", "sync_request")]),
//!         }).collect())
//!     }
//! }
//! ```
//!
//! What the host guarantees a handler:
//! - `process` and `run_job` run inside a transaction the host opened; an
//!   error or a panic rolls back everything the call wrote;
//! - a panic never crosses the boundary: it is caught here and reported as an
//!   error (build plugins with the default `panic = "unwind"`);
//! - private keys never reach a plugin; the host seals and opens envelopes.
#![deny(missing_docs)]

// sabi_trait expands to impls inside a const block, which a newer lint flags.
#[allow(non_local_definitions)]
pub mod context;
pub mod envelope;
pub mod error;
#[allow(non_local_definitions)]
pub mod handler;
pub mod module;
pub mod value;

/// Re-exported so that host-side code can name the ABI types it needs.
pub use abi_stable;

pub use context::{
    Context, FilterContext, HostRef, HostServices, HostServices_TO, Identity, LogLevel, Pruned,
    Row, Rows,
};
pub use envelope::{field, Envelope, EventId};
pub use error::PluginError;
pub use handler::{
    into_abi, AbiHandler, AbiHandler_TO, Handler, HandlerBox, HandlerSpec, ANY_EVENT_TYPE,
};
pub use module::{__private, PluginMod, PluginModRef, ABI_VERSION};
pub use value::{Field, Value};
