//! Crypto: this host's key pair and signing key ([`identity`]), sealing and
//! opening events and messages ([`event_crypto`]), signed events
//! ([`signed_event`]), what wraps a payload on the wire ([`transit`]), and
//! where randomness comes from ([`entropy`]).
//!
//! Pure functions of keys and bytes: no database, no sockets. It may use
//! [`crate::encoding`] only, so that storage and the network share one
//! implementation of every primitive.

pub mod entropy;
pub mod event_crypto;
pub mod identity;
pub mod signed_event;
pub mod transit;
