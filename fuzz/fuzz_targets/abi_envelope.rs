//! Envelopes built from arbitrary values crossing the plugin ABI through a
//! real handler call (TestHost: the pipeline and the abi_stable trait
//! objects, without dlopen). A mirror handler sends back what it got, so
//! the envelope must arrive unchanged; the input is a codec-encoded map.
#![no_main]

use quiet_host::encoding::codec;
use quiet_plugin_api::{export_plugin, Context, Envelope, Handler, PluginError, Value};
use quiet_plugin_test_support::TestHost;

struct Mirror;

impl Handler for Mirror {
    fn name(&self) -> &str {
        "mirror"
    }

    fn event_types(&self) -> &[&str] {
        &["mirror"]
    }

    fn process(
        &self,
        env: &Envelope,
        _ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        Ok(vec![env.clone().with("is_outgoing", true)])
    }
}

export_plugin! {
    name: "mirror",
    version: "0.0.1",
    handlers: [Mirror],
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(mut env) = codec::decode_envelope(data) else {
        return;
    };
    // Routed to the mirror whatever else it says; outgoing ones would
    // bypass handlers.
    env.set("event_type", "mirror");
    env.remove("is_outgoing");
    // One module for the process: each plugin_module() call leaks its root
    // module (72 bytes), as a loaded library's would.
    static MODULE: std::sync::OnceLock<quiet_plugin_api::PluginModRef> = std::sync::OnceLock::new();
    let mut host = TestHost::new(*MODULE.get_or_init(plugin_module)).unwrap();
    host.deliver(vec![env.clone()]).unwrap();
    assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    let mut sent = host.take_sent();
    assert_eq!(sent.len(), 1);
    let mut back = sent.pop().unwrap();
    assert_eq!(back.remove("is_outgoing"), Some(Value::from(true)));
    if !env.fields().any(|(_, v)| quiet_fuzz::has_nan(v)) {
        assert_eq!(back, env);
    }
});
