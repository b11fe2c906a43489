//! quiet-host: a long-lived host for the Quiet sync design.
//!
//! The host is built in layers, one folder each, listed here lowest first.
//! A layer may use the layers listed before it and never one after it
//! (`host/tests/layers.rs` fails the build on an upward import or a cycle).
//! An envelope from a peer reads from the bottom of this list up: the
//! [`network`] opens a frame, the [`engine`] hands it to [`plugins`], which
//! write through [`storage`].

pub mod encoding; // values and envelopes as bytes and as JSON
pub mod crypto; // our identity, event crypto, transit crypto, randomness
pub mod storage; // SQLite: schema, statements, the WAL, the event store, networks
pub mod plugins; // loading plugins and calling their handlers, within a budget
pub mod engine; // jobs, the scheduler, the pipeline, hot reload, the watchdog
pub mod network; // frames over TCP, between a socket and the engine
pub mod cli; // the commands: run a host, send, list, status, the demo

pub mod sim; // many real hosts on virtual time over a simulated network
