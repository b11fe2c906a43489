//! The engine: the thread that owns the database's write side and runs all
//! plugin work, one unit (a job run or a batch of frames) per transaction.
//!
//! - [`inbox`] is what reaches the engine: signals and authenticated
//!   frames, each holding its share of the queue budget;
//! - [`jobs`] reads `jobs.yaml`, and [`scheduler`] runs due jobs and
//!   received frames through the [`pipeline`], which hands each envelope to
//!   the handlers that subscribe to it and sends what leaves through an
//!   [`pipeline::Outbox`];
//! - [`replay`] offers every handler the stored events of its types that
//!   it has not seen, whenever it was installed, from where [`cursors`]
//!   says it stands;
//! - [`health`] is whether the engine can commit, which `status` shows
//!   even when the database cannot be written;
//! - [`reload`] watches the plugin folder and `jobs.yaml`, and [`watchdog`]
//!   replaces an engine thread stuck in a plugin call, through the
//!   engine's [`watch`].
//!
//! It may use [`crate::plugins`] and the layers below. It defines the ports
//! the network plugs into ([`inbox`], [`pipeline::Outbox`]) and names no
//! transport: [`crate::network`] and the simulator sit above it.

pub mod cursors;
pub mod health;
pub mod inbox;
pub mod jobs;
pub mod pipeline;
pub mod reload;
pub mod replay;
pub mod scheduler;
pub mod watch;
pub mod watchdog;
