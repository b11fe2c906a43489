//! Hostile sync requests and responses, as a member gone bad could send
//! them after the host has authenticated the frame: every field of the
//! plaintext, the negentropy messages and the id lists are arbitrary. The
//! handler must answer only well-formed requests within its limits, never
//! fail (a failure would dead-letter the envelope), and never store or
//! learn anything from a response that is not the live session's.
//!
//! Fixed seeds, so CI sees the same cases; a failure prints how to replay
//! it. `fuzz/fuzz_targets/sync_process.rs` drives the same paths with
//! libFuzzer (see FUZZING.md).

use quiet_plugin_api::{Envelope, Value};
use quiet_plugin_test_support::TestHost;
use quiet_test_support::hostile::{check, key, proptest::prelude::*, value as any_value};

const NET: &str = "0123456789abcdef0123456789abcdef";
/// A network the host is not in.
const OTHER_NET: &str = "fedcba9876543210fedcba9876543210";
const PEER_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const PEER_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
/// The responder's limit in these tests, low so that it is reached.
const MAX_EVENTS: usize = 8;

/// A host ("test-peer") in `NET` with 20 events, listening, that knows
/// `PEER_B`.
fn host() -> TestHost {
    let host = TestHost::new(sync::plugin_module()).unwrap();
    host.join_network(NET);
    host.listen_on("127.0.0.1:7001");
    host.add_peer(PEER_B, NET, 7002, true);
    for i in 0u8..20 {
        let (id, network, created_ms, event) = event_row(i);
        host.add_event(&id, network, created_ms, &event);
    }
    host
}

/// Event `i`'s row values; ids are `[i; 32]`, so a hostile need list of
/// small repeated bytes hits real events.
fn event_row(i: u8) -> (Vec<u8>, &'static str, i64, Vec<u8>) {
    (vec![i; 32], NET, 1000 + i64::from(i), vec![i; 100])
}

/// The responder's limits, as the job sets them.
fn set_limits(host: &mut TestHost) {
    let params = Value::map([("max_events_per_response", MAX_EVENTS as i64)]);
    host.run_job("sync", params).unwrap();
    host.take_sent();
}

/// Ids: real ones, near misses, and other lengths.
fn ids() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        (0u8..24).prop_map(|i| Value::from(vec![i; 32])),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::from),
        any_value(),
    ];
    prop::collection::vec(id, 0..20).prop_map(Value::from)
}

/// Negentropy messages: empty, garbage, or starting with the protocol
/// version byte (0x61) so that the parser gets further.
fn negentropy() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        prop::collection::vec(any::<u8>(), 0..80).prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..80).prop_map(|mut b| {
            b.insert(0, 0x61);
            Value::from(b)
        }),
        any_value(),
    ]
}

/// `plaintext` with `overrides` set (replacing or adding fields).
fn overlay(plaintext: Value, overrides: Vec<(String, Value)>) -> Value {
    let Value::Map(fields) = plaintext else {
        unreachable!("templates are maps")
    };
    Value::map(
        fields
            .into_iter()
            .map(|f| (f.key.to_string(), f.value))
            .chain(overrides),
    )
}

fn overrides() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec((key(), any_value()), 0..3)
}

fn no_dead_letters(host: &TestHost) -> Result<(), TestCaseError> {
    // Events the sync plugin hands on go to the event store, which counts
    // what it refuses: a dead letter is a handler failure.
    prop_assert_eq!(host.dead_letters(), Vec::<(String, String)>::new());
    Ok(())
}

/// The events the sync plugin handed to the event store: the test host is
/// not a member of `NET`, so each is refused and counted.
fn stores(host: &TestHost) -> i64 {
    host.count(
        "SELECT COALESCE(SUM(value), 0) FROM counters \
         WHERE name IN ('drop_event_for_unknown_network', 'drop_malformed_store_event', \
                        'drop_oversized_event')",
    )
}

#[test]
fn any_plaintext_is_dropped_without_failing() {
    check(
        "any_plaintext_is_dropped_without_failing",
        300,
        (
            prop::sample::select(vec!["sync_request", "sync_response"]),
            any_value(),
            prop::option::of("[0-9a-f]{32}"),
        ),
        |(event_type, plaintext, in_response_to)| {
            let mut host = host();
            let mut env = Envelope::of_type(event_type)
                .with("sender_peer_id", PEER_A)
                .with("network_id", NET)
                .with("event_plaintext", plaintext);
            if let Some(id) = in_response_to {
                env.set("in_response_to", id);
            }
            host.deliver(vec![env]).unwrap();
            prop_assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
            prop_assert!(host.take_sent().is_empty());
            Ok(())
        },
    );
}

/// A well-formed round-0 request (from `PEER_A` to us, as the host's
/// envelope says).
fn request_template(negentropy: Value, need: Value) -> Value {
    Value::map([
        ("type", Value::from("sync_request")),
        ("request_id", Value::from([0x11u8; 16])),
        ("transit_secret", Value::from([7u8; 32])),
        (
            "timestamp_ms",
            Value::from(quiet_host::storage::db::now_ms()),
        ),
        ("reply_ip", Value::from("10.0.0.9")),
        ("reply_port", Value::from(7009)),
        ("session_id", Value::from([0x22u8; 16])),
        ("round", Value::from(0)),
        ("negentropy", negentropy),
        ("need", need),
    ])
}

#[test]
fn hostile_requests_are_answered_within_limits_or_dropped() {
    // So that the checks on answers are not vacuous.
    let answered = std::cell::Cell::new(0);
    check(
        "hostile_requests_are_answered_within_limits_or_dropped",
        300,
        (negentropy(), ids(), overrides(), any::<bool>()),
        |(negentropy, need, overrides, twice)| {
            let mut host = host();
            set_limits(&mut host);
            let request = overlay(request_template(negentropy, need.clone()), overrides);
            let env = Envelope::of_type("sync_request")
                .with("sender_peer_id", PEER_A)
                .with("network_id", NET)
                .with("event_plaintext", request.clone());
            let copies = if twice { 2 } else { 1 };
            host.deliver(vec![env; copies]).unwrap();
            prop_assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
            let sent = host.take_sent();
            // A replayed copy is never answered.
            prop_assert!(sent.len() <= 1);
            if let Some(answer) = sent.first() {
                answered.set(answered.get() + 1);
                // Answered: only to the verified sender, at its own request.
                prop_assert_eq!(answer.str("seal_to"), Some(PEER_A));
                let request_id = request
                    .get("request_id")
                    .and_then(Value::as_bytes)
                    .map(hex::encode);
                prop_assert_eq!(answer.str("in_response_to"), request_id.as_deref());
                let p = answer.plaintext().unwrap();
                let len = |k| p.get(k).and_then(Value::as_list).map_or(0, <[Value]>::len);
                prop_assert!(len("events") <= MAX_EVENTS);
                let asked = request
                    .get("need")
                    .and_then(Value::as_list)
                    .map_or(0, <[Value]>::len);
                prop_assert!(len("events") + len("deferred") <= asked);
            }
            Ok(())
        },
    );
    assert!(answered.get() > 0, "no generated request was answered");
}

/// A host with one session running with `PEER_B`; returns its request.
fn requester() -> (TestHost, Value) {
    let mut host = host();
    host.run_job(
        "sync",
        Value::map([("max_events_per_response", MAX_EVENTS as i64)]),
    )
    .unwrap();
    let mut sent = host.take_sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let request = sent.pop().unwrap().plaintext().unwrap().clone();
    (host, request)
}

fn peers() -> impl Strategy<Value = Value> {
    let peer = prop_oneof![
        Just(Value::map([
            ("peer_id", Value::from("cc".repeat(32))),
            ("ip", Value::from("10.1.1.1")),
            ("port", Value::from(7003)),
        ])),
        prop::collection::vec((key(), any_value()), 0..4).prop_map(Value::map),
        any_value(),
    ];
    prop::collection::vec(peer, 0..6).prop_map(Value::from)
}

#[test]
fn hostile_responses_store_nothing_unless_they_are_the_sessions() {
    let stored = std::cell::Cell::new(0);
    check(
        "hostile_responses_store_nothing_unless_they_are_the_sessions",
        300,
        (
            negentropy(),
            prop::collection::vec(
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::from),
                0..6,
            ),
            ids(),
            peers(),
            overrides(),
            prop::sample::select(vec![PEER_B, PEER_A]),
            prop::sample::select(vec![NET, OTHER_NET]),
        ),
        |(negentropy, events, deferred, peers, overrides, sender, network)| {
            let (mut host, request) = requester();
            let request_id = request.get("request_id").and_then(Value::as_bytes).unwrap();
            let request_id = hex::encode(request_id);
            let response = overlay(
                Value::map([
                    ("type", Value::from("sync_response")),
                    ("session_id", request.get("session_id").unwrap().clone()),
                    ("negentropy", negentropy),
                    ("events", Value::from(events)),
                    ("deferred", deferred),
                    ("peers", peers),
                ]),
                overrides,
            );
            let env = Envelope::of_type("sync_response")
                .with("sender_peer_id", sender)
                .with("network_id", network)
                .with("in_response_to", request_id.as_str())
                .with("event_plaintext", response.clone());
            // The second copy is a replay: the session no longer expects it.
            host.deliver(vec![env.clone(), env]).unwrap();
            no_dead_letters(&host)?;
            let counter = |name: &str| {
                host.count(&format!(
                    "SELECT COALESCE((SELECT value FROM counters WHERE name = '{name}'), 0)"
                ))
            };
            prop_assert_eq!(counter("sync_unknown_response"), 1);
            let is_the_sessions = sender == PEER_B
                && network == NET
                && response.get("session_id") == request.get("session_id");
            stored.set(stored.get() + stores(&host));
            if !is_the_sessions {
                prop_assert_eq!(counter("sync_rejected_response"), 1);
                prop_assert_eq!(stores(&host), 0, "stored from a rejected response");
                prop_assert!(host.take_sent().is_empty());
            }
            // Only well-formed peers other than us are ever learned, and
            // only as candidates: a response adds no address but its
            // sender's, and at most 16 candidates.
            for table in ["addresses", "sync_candidates"] {
                prop_assert_eq!(
                    host.count(&format!(
                        "SELECT COUNT(*) FROM {table} WHERE length(peer_id) != 64 \
                         OR peer_id GLOB '*[^0-9a-f]*' OR port NOT BETWEEN 1 AND 65535"
                    )),
                    0
                );
            }
            prop_assert_eq!(
                host.count(&format!(
                    "SELECT COUNT(*) FROM addresses WHERE peer_id != '{PEER_B}'"
                )),
                0
            );
            prop_assert!(host.count("SELECT COUNT(*) FROM sync_candidates") <= 16);
            for next in host.take_sent() {
                let need = next
                    .plaintext()
                    .and_then(|p| p.get("need"))
                    .and_then(Value::as_list);
                prop_assert!(need.map_or(0, <[Value]>::len) <= MAX_EVENTS);
            }
            Ok(())
        },
    );
    assert!(stored.get() > 0, "no generated response was stored from");
}
