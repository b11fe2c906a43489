//! jobs.yaml: any text parses to a valid config or is refused with one
//! `path:line:column: what` line.
#![no_main]

use std::path::Path;

use quiet_host::engine::jobs;
use quiet_plugin_api::Value;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match jobs::parse(text, Path::new("jobs.yaml")) {
        Ok(config) => {
            for (i, job) in config.jobs.iter().enumerate() {
                assert!(job.frequency_ms >= jobs::MIN_FREQUENCY_MS);
                assert!(matches!(job.params, Value::Map(_)));
                assert!(config.jobs[..i].iter().all(|j| j.name != job.name));
            }
        }
        Err(e) => {
            let line = e.to_string();
            assert!(
                line.starts_with("jobs.yaml") && !line.contains('\n'),
                "{line}"
            );
        }
    }
});
