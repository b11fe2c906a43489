//! Storage: the SQLite database and everything that is kept in it or beside
//! it in the data folder.
//!
//! - [`db`] opens connections, owns the host's schema and the clock, and
//!   checkpoints the WAL, which [`wal_writes`] writes in large pieces;
//! - [`statements`] holds a run's prepared statements, and [`plugin_sql`]
//!   guards the statements plugins send;
//! - [`event_store`] stores encrypted events once (taking what the
//!   network opened ahead from [`pre_opened`]), [`networks`] keeps
//!   network keys and invites, [`membership`] computes who is in a
//!   network from its signed membership events and [`members`] keeps the
//!   result as each is routed, [`counters`] what was
//!   dropped and sent,
//!   and [`dead_letters`] prunes what could not be delivered.
//!
//! It may use [`crate::encoding`] and [`crate::crypto`]; it knows nothing of
//! plugins, the engine or the network, which all write through it.

pub mod counters;
pub mod db;
pub mod dead_letters;
pub mod event_store;
pub mod members;
pub mod membership;
pub mod networks;
pub mod pre_opened;
pub mod plugin_sql;
pub mod statements;
pub mod wal_writes;
