//! Plugins: the host's side of the plugin ABI.
//!
//! - [`loader`] loads a plugin library with abi_stable and checks it;
//! - [`registry`] indexes one generation of loaded plugins and their
//!   handlers, and the builds that were disabled;
//! - [`handler`] calls one handler, each call timed by [`call_budget`];
//! - [`context`] is what a call may use of the host: SQL on the caller's
//!   transaction, the clock, logging and the public identity.
//!
//! It may use [`crate::storage`] and the layers below it. It does not know
//! who calls handlers or when: that is [`crate::engine`], above it.

pub mod call_budget;
pub mod context;
pub mod handler;
pub mod loader;
pub mod registry;
