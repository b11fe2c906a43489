//! Encoding: how plugin values and envelopes are written down, as compact
//! bytes for what leaves the process ([`codec`]) and as JSON for people
//! ([`json`]); and what may name an event type ([`event_type`]).
//!
//! The lowest layer: it uses only the plugin API's types, so every layer
//! above can encode without pulling in anything else.

pub mod codec;
pub mod event_type;
pub mod json;
