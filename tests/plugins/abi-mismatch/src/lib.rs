//! Test-only plugin built against an ABI-incompatible `quiet-plugin-api`
//! (its feature `__abi_mismatch_for_tests` changes the layout of `Value`).
//! The host must refuse to load it, with a clear error, instead of crashing.

use quiet_plugin_api::{export_plugin, Handler};

struct Mismatch;

impl Handler for Mismatch {
    fn name(&self) -> &str {
        "mismatch"
    }

    fn event_types(&self) -> &[&str] {
        &["tick"]
    }
}

export_plugin! {
    name: "abi_mismatch",
    version: env!("CARGO_PKG_VERSION"),
    handlers: [Mismatch],
}
