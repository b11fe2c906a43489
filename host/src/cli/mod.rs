//! The command line: [`host`] starts a running host (engine, network,
//! reload, watchdog), [`commands`] are the one-shot commands that write to
//! a host's data folder, [`status`] reads back what a host did, and
//! [`demo`] runs a few hosts side by side; [`terminal`] makes the fields
//! others chose safe to print.
//!
//! The top layer: it may use every layer below; nothing but `main.rs`
//! uses it.

pub mod commands;
pub mod demo;
pub mod host;
pub mod status;
pub mod terminal;
