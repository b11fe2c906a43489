//! Property tests of hostile input, reproducible in CI.
//!
//! [`check`] runs a proptest property from a fixed seed (derived from the
//! property's name), so CI sees the same cases on every run, and a failure
//! prints the shrunk input and the command that replays it. Set
//! `QUIET_FUZZ_SEED` to explore other seeds and `QUIET_FUZZ_CASES` to run
//! more cases, e.g. for a longer run by hand.

use std::fmt::Debug;

use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner},
};
use quiet_plugin_api::{Envelope, Value};

pub use proptest;

/// Runs `test` on `cases` inputs drawn from `strategy`; panics with the
/// minimal failing input and how to replay it.
pub fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = std::env::var("QUIET_FUZZ_SEED")
        .ok()
        .and_then(|s| parse_seed(&s))
        .unwrap_or_else(|| fnv1a(name.as_bytes()));
    let cases = std::env::var("QUIET_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    let config = Config {
        cases,
        // The fixed seed makes every failure reproducible, so no regression
        // files are written into the source tree.
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    match runner.run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => panic!(
            "property {name} failed: {reason}\nminimal input: {input:#?}\n\
             replay: QUIET_FUZZ_SEED={seed:#x} QUIET_FUZZ_CASES={cases} cargo test --workspace -- {name}"
        ),
        Err(TestError::Abort(reason)) => panic!(
            "property {name} aborted: {reason}\n\
             replay: QUIET_FUZZ_SEED={seed:#x} QUIET_FUZZ_CASES={cases} cargo test --workspace -- {name}"
        ),
    }
}

fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A stable hash of the property's name: different properties explore
/// different inputs, each the same on every run.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Short keys, so that generated maps often share names with real fields.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{0,12}",
        1 => prop::sample::select(vec![
            "type", "event_type", "network_id", "peer_id", "request_id", "session_id",
            "events", "need", "deferred", "peers", "negentropy", "round", "in_response_to",
            "event_plaintext", "sender_peer_id", "transit_secret", "is_outgoing",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// Any [`Value`], nested up to four levels, maps with unique keys (as
/// `Value::map` builds them).
pub fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::from),
        // Lengths that real fields check for: ids, keys, proofs.
        prop::sample::select(vec![16usize, 24, 32, 64])
            .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::vec((key(), inner), 0..8).prop_map(Value::map),
        ]
    })
}

/// Any envelope: up to 12 fields of any value, often with a real
/// `event_type`.
pub fn envelope(event_types: &'static [&'static str]) -> impl Strategy<Value = Envelope> {
    let event_type = prop_oneof![
        3 => prop::sample::select(event_types).prop_map(Value::from),
        1 => value(),
    ];
    (event_type, prop::collection::vec((key(), value()), 0..12)).prop_map(|(t, fields)| {
        fields
            .into_iter()
            .fold(Envelope::new().with("event_type", t), |env, (k, v)| {
                // Keep the chosen type: that is what routes it to a handler.
                if k == "event_type" {
                    env
                } else {
                    env.with(&k, v)
                }
            })
    })
}
