//! Encoding: how plugin values and envelopes are written down, as compact
//! bytes for what leaves the process ([`codec`]) and as JSON for people
//! ([`json`]).
//!
//! The lowest layer: it uses only the plugin API's types, so every layer
//! above can encode without pulling in anything else.

pub mod codec;
pub mod json;
