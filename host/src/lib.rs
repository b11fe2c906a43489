//! quiet-host: a long-lived host for the Quiet sync design.
//!
//! Follow one envelope from top to bottom:
//! - [`scheduler`] finds a due job in [`jobs`] and calls the job's
//!   [`handler`] inside a transaction ([`db`]);
//! - [`pipeline`] hands each envelope it returned to the handlers that
//!   subscribe to it, giving each a [`context`] onto the same transaction
//!   (whose [`statements`] a run prepares once), and records failures as
//!   dead letters;
//! - handlers come from plugin libraries that [`loader`] loads and
//!   [`registry`] indexes, one generation at a time, kept current by
//!   [`reload`];
//! - [`host`] starts all of it, and [`status`] reads back what it did.
//!
//! Plugin authors: [`testing::TestHost`] runs a plugin's handlers on an
//! in-memory host, for unit tests without a running `quiet-host`, and
//! [`sim::Sim`] runs many real hosts on virtual time over a simulated,
//! lossy network.

pub mod codec;
pub mod commands;
pub mod context;
pub mod counters;
pub mod db;
pub mod demo;
pub mod entropy;
pub mod event_crypto;
pub mod event_store;
pub mod handler;
pub mod host;
pub mod identity;
pub mod jobs;
pub mod json;
pub mod loader;
pub mod network;
pub mod networks;
pub mod pipeline;
pub mod registry;
pub mod reload;
pub mod scheduler;
pub mod sim;
pub mod statements;
pub mod status;
pub mod testing;
pub mod transit;
pub mod wal_writes;
pub mod watchdog;
