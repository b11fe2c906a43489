//! The sync plugin's `process` with hostile, already authenticated
//! envelopes, through TestHost (real pipeline, real ABI calls, in-memory
//! SQLite). The first byte picks the shape; the rest is decoded with the
//! codec into a value: 0: the whole plaintext of a request; 1: of a
//! response; 2: fields set over a well-formed request to us; 3: fields set
//! over a well-formed response to our live session. Never a failure (a
//! dead letter other than "no event store"), never a store or an answer
//! that the checks below rule out.
#![no_main]

use quiet_host::encoding::codec;
use quiet_plugin_api::{Envelope, Value};
use quiet_plugin_test_support::TestHost;

const NET: &str = "0123456789abcdef0123456789abcdef";
const PEER_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const PEER_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const MAX_EVENTS: i64 = 8;

fn host() -> TestHost {
    // One module for the process: each plugin_module() call leaks its root
    // module (72 bytes), as a loaded library's would.
    static MODULE: std::sync::OnceLock<quiet_plugin_api::PluginModRef> = std::sync::OnceLock::new();
    let mut host = TestHost::new(*MODULE.get_or_init(sync::plugin_module)).unwrap();
    host.join_network(NET);
    host.listen_on("127.0.0.1:7001");
    host.add_peer(PEER_B, NET, 7002, true);
    for i in 0u8..20 {
        host.add_event(&[i; 32], NET, 1000 + i64::from(i), &[i; 100]);
    }
    host.run_job(
        "sync",
        Value::map([("max_events_per_response", MAX_EVENTS)]),
    )
    .unwrap();
    host
}

fn request() -> Value {
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
    ])
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = codec::decode(rest) else {
        return;
    };
    let mut host = host();
    // The job's own round-0 request to PEER_B: our live session.
    let ours = host.take_sent().pop().expect("a request to PEER_B");
    let ours = ours.plaintext().unwrap().clone();
    let request_id = hex::encode(ours.get("request_id").and_then(Value::as_bytes).unwrap());
    let (env, is_request) = match mode % 4 {
        0 => (
            Envelope::of_type("sync_request").with("event_plaintext", value),
            true,
        ),
        1 => (
            Envelope::of_type("sync_response").with("event_plaintext", value),
            false,
        ),
        2 => {
            let p = quiet_fuzz::overlay(request(), &value);
            (
                Envelope::of_type("sync_request").with("event_plaintext", p),
                true,
            )
        }
        _ => {
            let base = Value::map([
                ("type", Value::from("sync_response")),
                ("session_id", ours.get("session_id").unwrap().clone()),
            ]);
            let p = quiet_fuzz::overlay(base, &value);
            (
                Envelope::of_type("sync_response").with("event_plaintext", p),
                false,
            )
        }
    };
    let sender = if is_request { PEER_A } else { PEER_B };
    let env = env
        .with("sender_peer_id", sender)
        .with("network_id", NET)
        .with("in_response_to", request_id.as_str());
    let plaintext = env.plaintext().unwrap().clone();
    host.deliver(vec![env.clone(), env]).unwrap();
    for (_, reason) in host.dead_letters() {
        assert_eq!(reason, "this host has no event store");
    }
    let sent = host.take_sent();
    if is_request {
        assert!(host.dead_letters().is_empty());
        // At most one answer (the copy is a replay), to the verified sender.
        assert!(sent.len() <= 1);
        for answer in sent {
            assert_eq!(answer.str("seal_to"), Some(PEER_A));
            let p = answer.plaintext().unwrap();
            let events = p
                .get("events")
                .and_then(Value::as_list)
                .map_or(0, <[Value]>::len);
            assert!(events as i64 <= MAX_EVENTS);
        }
    } else {
        let is_the_sessions = plaintext.get("session_id") == ours.get("session_id");
        if !is_the_sessions {
            assert!(
                host.dead_letters().is_empty(),
                "stored from a rejected response"
            );
            assert!(sent.is_empty());
        }
        for next in sent {
            let need = next
                .plaintext()
                .and_then(|p| p.get("need"))
                .and_then(Value::as_list);
            assert!(need.map_or(0, <[Value]>::len) as i64 <= MAX_EVENTS);
        }
        let bad_peers = host.count(
            "SELECT COUNT(*) FROM addresses WHERE length(peer_id) != 64 \
             OR peer_id GLOB '*[^0-9a-f]*' OR port NOT BETWEEN 1 AND 65535",
        );
        assert_eq!(bad_peers, 0);
    }
});
