//! Hostile input to everything in the host that parses untrusted bytes:
//! the TLV codec, sealed payloads, network events (signed ones too),
//! transit frames, whole inbound frames, jobs.yaml, and envelopes crossing
//! the plugin ABI.
//!
//! Each property runs a fixed number of cases from a fixed seed (see
//! `quiet_test_support::hostile::check`); a failure prints the replay
//! command. The same entry points are fuzzed with libFuzzer in `fuzz/`
//! (see FUZZING.md). The named tests at the end check, with real crypto,
//! that forged and replayed frames are never accepted.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc};

use quiet_host::{
    crypto::{
        event_crypto::{self, CryptoError, NetworkKey},
        identity::{HostIdentity, VerifyingKeys},
        signed_event::{self, EventError, MAX_DEPS, RESERVED_KEYS},
        transit::{self, LiveRequests, TransitError},
    },
    encoding::{codec, event_type},
    engine::jobs,
    network::{inbound::Inbound, wire::Wire},
    storage::{
        counters::{self, Counters},
        db,
        networks::NetworkKeys,
    },
};
use quiet_plugin_api::{export_plugin, field, Context, Envelope, Handler, PluginError, Value};
use quiet_plugin_test_support::TestHost;
use quiet_test_support::hostile::{check, envelope, key, proptest::prelude::*, value as any_value};

/// The network our test host is a member of.
const NET: &str = "0123456789abcdef0123456789abcdef";
/// Another network, whose key we hold too.
const NET_B: &str = "fedcba9876543210fedcba9876543210";
/// A network we are not in.
const NET_X: &str = "00000000000000000000000000000000";

/// Bytes with a bias towards the codec's tags and small lengths.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![3 => 0u8..10, 1 => any::<u8>()], 0..max)
}

/// `bytes` with one of: a byte flipped, cut short, a byte inserted.
fn mutate(mut bytes: Vec<u8>, at: usize, with: u8, how: u8) -> Vec<u8> {
    if bytes.is_empty() {
        return vec![with];
    }
    let at = at % bytes.len();
    match how % 3 {
        0 => bytes[at] ^= with.max(1),
        1 => bytes.truncate(at),
        _ => bytes.insert(at, with),
    }
    bytes
}

fn mutation() -> impl Strategy<Value = (usize, u8, u8)> {
    (any::<usize>(), any::<u8>(), any::<u8>())
}

/// Whether `v` holds a NaN, which compares unequal to itself. (Not
/// `v != v`: RVec's equality takes the same pointer as equal.)
fn has_nan(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_nan(),
        Value::List(items) => items.iter().any(has_nan),
        Value::Map(fields) => fields.iter().any(|f| has_nan(&f.value)),
        _ => false,
    }
}

fn encoded(v: &Value) -> Vec<u8> {
    codec::encode(v)
}

// ---- codec ---------------------------------------------------------------

/// Whatever decodes re-encodes to bytes that decode to the same value, and
/// envelopes decode exactly when the value is a map.
fn decodes_consistently(input: &[u8]) -> Result<(), TestCaseError> {
    match codec::decode(input) {
        Ok(v) => {
            let again = encoded(&v);
            // Not `== input`: lengths may be written non-minimally.
            prop_assert_eq!(encoded(&codec::decode(&again).unwrap()), again.clone());
            prop_assert!(again.len() <= input.len());
            prop_assert_eq!(
                codec::decode_envelope(input).is_ok(),
                matches!(v, Value::Map(_))
            );
        }
        Err(_) => prop_assert!(codec::decode_envelope(input).is_err()),
    }
    Ok(())
}

#[test]
fn codec_decodes_any_bytes_without_panicking() {
    check(
        "codec_decodes_any_bytes_without_panicking",
        2000,
        bytes(256),
        |b| decodes_consistently(&b),
    );
}

#[test]
fn codec_refuses_or_rereads_mutated_encodings() {
    check(
        "codec_refuses_or_rereads_mutated_encodings",
        1000,
        (any_value(), mutation()),
        |(v, (at, with, how))| decodes_consistently(&mutate(encoded(&v), at, with, how)),
    );
}

#[test]
fn codec_round_trips_values_and_envelopes() {
    check(
        "codec_round_trips_values_and_envelopes",
        1000,
        (any_value(), envelope(&["message"])),
        |(v, env)| {
            let bytes = encoded(&v);
            let back = codec::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // NaN != NaN; the bytes still match.
            prop_assert_eq!(encoded(&back), bytes);
            if !has_nan(&v) {
                prop_assert_eq!(back, v);
            }
            let env_back = codec::decode_envelope(&codec::encode_envelope(&env))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if !env.fields().any(|(_, v)| has_nan(v)) {
                prop_assert_eq!(env_back, env);
            }
            Ok(())
        },
    );
}

// ---- sealed payloads and network events ----------------------------------

fn identity() -> (tempfile::TempDir, HostIdentity) {
    let dir = tempfile::tempdir().unwrap();
    let id = HostIdentity::load_or_create(dir.path()).unwrap();
    (dir, id)
}

/// An inner map as `seal_from` writes it, with any field replaced or added.
fn inner_payload() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(vec!["p", "s", "a", "n", "m", "x"]);
    prop_oneof![
        bytes(200),
        prop::collection::vec((field, any_value()), 0..6)
            .prop_map(|fields| encoded(&Value::map(fields))),
    ]
}

#[test]
fn sealed_payloads_from_strangers_never_open() {
    let (_d, me) = identity();
    let (_d2, other) = identity();
    let key = NetworkKey([7; 32]);
    let genuine = event_crypto::seal_from(&other, me.public_key(), b"hello", Some((NET, &key)));
    check(
        "sealed_payloads_from_strangers_never_open",
        300,
        (bytes(200), inner_payload(), mutation()),
        |(raw, inner, (at, with, how))| {
            prop_assert_eq!(
                event_crypto::open_from(&me, &raw),
                Err(CryptoError::BadSeal)
            );
            // Sealed to us for real, but no proof of a sender can be made
            // without one of the two secret keys.
            let sealed = event_crypto::seal(me.public_key(), &inner);
            prop_assert!(event_crypto::open_from(&me, &sealed).is_err());
            let mutated = mutate(genuine.clone(), at, with, how);
            if mutated != genuine {
                prop_assert_eq!(
                    event_crypto::open_from(&me, &mutated),
                    Err(CryptoError::BadSeal)
                );
            }
            Ok(())
        },
    );
}

#[test]
fn events_decrypt_only_unaltered_and_round_trip() {
    let key = NetworkKey([3; 32]);
    check(
        "events_decrypt_only_unaltered_and_round_trip",
        500,
        (any::<i64>(), bytes(300), mutation()),
        |(created_ms, plaintext, (at, with, how))| {
            let event = event_crypto::encrypt_event(&key, created_ms, &plaintext);
            prop_assert_eq!(
                event_crypto::decrypt_event(&key, &event),
                Ok((created_ms, plaintext.clone()))
            );
            let mutated = mutate(event.clone(), at, with, how);
            if mutated != event {
                prop_assert_eq!(
                    event_crypto::decrypt_event(&key, &mutated),
                    Err(CryptoError::BadEvent)
                );
            }
            prop_assert_eq!(
                event_crypto::decrypt_event(&key, &plaintext),
                Err(CryptoError::BadEvent)
            );
            Ok(())
        },
    );
}

// ---- signed events (format 3) ---------------------------------------------

/// A format 3 body as the plan writes it, encoded here on its own (not by
/// the host), so that the parser is checked against the format.
fn body_bytes(
    created_ms: i64,
    author: &[u8; 32],
    event_type: &str,
    deps: &[[u8; 32]],
    content: &[u8],
) -> Vec<u8> {
    let mut b = created_ms.to_be_bytes().to_vec();
    b.extend_from_slice(author);
    b.push(event_type.len() as u8);
    b.extend_from_slice(event_type.as_bytes());
    b.push(deps.len() as u8);
    deps.iter().for_each(|d| b.extend_from_slice(d));
    b.extend_from_slice(content);
    b
}

/// Content that is often a map, sometimes with a reserved key.
fn event_content() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec![
        "text",
        "emoji",
        "type",
        "author",
        "created_ms",
        "deps",
    ]);
    prop_oneof![
        3 => prop::collection::vec((field, any_value()), 0..4).prop_map(Value::map),
        1 => any_value(),
    ]
}

/// The parts of a body, valid or nearly: types, dep counts and orders on
/// both sides of the rules.
fn body_parts() -> impl Strategy<Value = (i64, [u8; 32], String, Vec<[u8; 32]>, Value)> {
    let event_type = prop_oneof![
        3 => "[a-z_.:-]{1,12}",
        1 => prop::sample::select(vec!["", "a b", "é", "x\n"]).prop_map(str::to_owned),
        1 => Just("t".repeat(65)),
    ];
    let deps = prop::collection::vec(any::<[u8; 32]>(), 0..MAX_DEPS + 3).prop_flat_map(|mut d| {
        let sorted = {
            d.sort_unstable();
            d.dedup();
            d.clone()
        };
        prop_oneof![3 => Just(sorted), 1 => Just(d).prop_shuffle()]
    });
    (
        any::<i64>(),
        any::<[u8; 32]>(),
        event_type,
        deps,
        event_content(),
    )
}

/// Whether parts follow the rules a body is held to.
fn follows_rules(event_type: &str, deps: &[[u8; 32]], content: &Value) -> bool {
    let map_without_reserved = match content {
        Value::Map(fields) => fields
            .iter()
            .all(|f| !RESERVED_KEYS.contains(&f.key.as_str())),
        _ => false,
    };
    event_type::is_valid(event_type)
        && deps.len() <= MAX_DEPS
        && deps.windows(2).all(|w| w[0] < w[1])
        && map_without_reserved
}

/// Parsed, a body keeps to the rules and is exactly its parts' bytes.
fn parses_to_its_rules(input: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(b) = signed_event::parse_body(input) {
        prop_assert!(follows_rules(b.event_type, &b.deps, &b.content));
        let again = body_bytes(
            b.created_ms,
            &b.author,
            b.event_type,
            &b.deps,
            b.content_bytes,
        );
        prop_assert_eq!(again, input.to_vec());
    }
    Ok(())
}

#[test]
fn signed_event_bodies_of_any_bytes_parse_to_their_rules_or_are_refused() {
    let parsed_genuine = std::cell::Cell::new(0);
    check(
        "signed_event_bodies_of_any_bytes_parse_to_their_rules_or_are_refused",
        2000,
        (bytes(300), body_parts(), mutation()),
        |(raw, (created_ms, author, event_type, deps, content), (at, with, how))| {
            parses_to_its_rules(&raw)?;
            // Parts written as the format says parse exactly when they
            // keep to the rules.
            let genuine = body_bytes(created_ms, &author, &event_type, &deps, &encoded(&content));
            let parsed = signed_event::parse_body(&genuine);
            prop_assert_eq!(parsed.is_ok(), follows_rules(&event_type, &deps, &content));
            if let Ok(b) = parsed {
                parsed_genuine.set(parsed_genuine.get() + 1);
                prop_assert_eq!(
                    (b.created_ms, b.author, b.event_type, &b.deps),
                    (created_ms, author, event_type.as_str(), &deps)
                );
            }
            parses_to_its_rules(&genuine)?;
            parses_to_its_rules(&mutate(genuine, at, with, how))
        },
    );
    // Not vacuous: the rules pass often enough to test the parts' bytes.
    assert!(parsed_genuine.get() > 200, "{}", parsed_genuine.get());
}

#[test]
fn signed_events_open_only_unaltered() {
    let (_d, author) = identity();
    let key = NetworkKey([4; 32]);
    let keys = VerifyingKeys::default();
    check(
        "signed_events_open_only_unaltered",
        300,
        (
            any::<i64>(),
            prop::collection::vec(any::<[u8; 32]>(), 0..4),
            bytes(200),
            mutation(),
        ),
        |(created_ms, deps, text, (at, with, how))| {
            let content = encoded(&Value::map([("text", Value::from(text))]));
            let (id, event) = signed_event::seal_event_v3(
                author.signing(),
                NET,
                &key,
                created_ms,
                "message",
                &deps,
                &content,
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let open_in = |net: &str, event: &[u8]| {
                signed_event::open_event_v3(net, &key, event, &keys)
                    .and_then(signed_event::Unverified::verify)
            };
            let open = |event: &[u8]| open_in(NET, event);
            let opened = open(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!((opened.id, opened.created_ms), (id, created_ms));
            prop_assert_eq!(opened.author_peer_id(), author.peer_id());
            let mutated = mutate(event.clone(), at, with, how);
            if mutated != event {
                prop_assert!(open(&mutated).is_err());
            }
            // Offered as another network's (whose key it happens to be): never.
            prop_assert_eq!(open_in(NET_B, &event).err(), Some(EventError::BadSignature));
            prop_assert!(open(&text_as_event(&content)).is_err());
            Ok(())
        },
    );
}

/// Any bytes, offered as a signed event.
fn text_as_event(bytes: &[u8]) -> Vec<u8> {
    [&[0u8; 8][..], &[signed_event::FORMAT_3], bytes].concat()
}

// ---- transit frames ------------------------------------------------------

#[test]
fn forged_transit_frames_never_consume_a_live_request() {
    let (id, secret) = ([5u8; 16], [6u8; 32]);
    check(
        "forged_transit_frames_never_consume_a_live_request",
        500,
        (bytes(120), bytes(64), mutation()),
        |(raw, sealed, (at, with, how))| {
            let live = LiveRequests::default();
            let asked = transit::Live {
                secret,
                peer_id: "peer".into(),
                network_id: "net".into(),
            };
            live.register(id, asked, 1_000, 30_000);
            let frame = transit::wrap_response(id, &secret, &sealed);
            prop_assert!(live.accept(raw, 2_000).is_err());
            // Past the tag byte, which the reader dispatched on.
            let mutated = [&frame[..1], &mutate(frame[1..].to_vec(), at, with, how)].concat();
            if mutated != frame {
                prop_assert!(live.accept(mutated, 2_000).is_err());
            }
            // Still live: the genuine answer is taken, once.
            let accepted = live
                .accept(frame.clone(), 2_000)
                .map(|a| (a.request_id, a.body().to_vec()));
            prop_assert_eq!(accepted, Ok((id, sealed)));
            prop_assert_eq!(live.accept(frame, 2_000), Err(TransitError::UnknownRequest));
            Ok(())
        },
    );
}

// ---- whole inbound frames -------------------------------------------------

/// A host's receiving side, with real keys: member of `NET` and `NET_B`.
struct Receiver {
    _dir: tempfile::TempDir,
    identity: Arc<HostIdentity>,
    live: Arc<LiveRequests>,
    counters: Arc<Counters>,
    inbound: Inbound,
    key: NetworkKey,
    key_b: NetworkKey,
}

impl Receiver {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let identity = Arc::new(HostIdentity::load_or_create(dir.path()).unwrap());
        let (key, key_b) = (NetworkKey([1; 32]), NetworkKey([2; 32]));
        let keys = NetworkKeys::new(dir.path());
        for (net, k) in [(NET, &key), (NET_B, &key_b)] {
            keys.store(net, k).unwrap();
        }
        let (live, counters) = (Arc::<LiveRequests>::default(), Arc::<Counters>::default());
        let inbound = Inbound::new(Wire {
            identity: identity.clone(),
            live: live.clone(),
            keys: Arc::new(keys),
            counters: counters.clone(),
        });
        Self {
            _dir: dir,
            identity,
            live,
            counters,
            inbound,
            key,
            key_b,
        }
    }

    fn open(&self, bytes: &[u8]) -> Option<Envelope> {
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        self.inbound.open(from, bytes.to_vec()).ok()
    }

    /// The drops counted so far, by reason, and resets them.
    fn drops(&self) -> BTreeMap<String, i64> {
        let conn = db::open_in_memory().unwrap();
        counters::write(&conn, &self.counters.take()).unwrap();
        let mut stmt = conn.prepare("SELECT name, value FROM counters").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// Asserts that `bytes` is dropped, counted as `reason`.
    fn refuses(&self, bytes: &[u8], reason: &str) {
        assert_eq!(self.open(bytes), None, "accepted, expected {reason}");
        assert_eq!(self.drops(), BTreeMap::from([(reason.to_owned(), 1)]));
    }
}

/// A request plaintext about `network`, from `peer`.
fn request(network: &str, peer: &str) -> Value {
    Value::map([
        ("type", Value::from("sync_request")),
        ("network_id", Value::from(network)),
        ("peer_id", Value::from(peer)),
    ])
}

/// Any value, or a typed request with some fields replaced.
fn plaintext() -> impl Strategy<Value = Value> {
    let typed = prop::collection::vec((key(), any_value()), 0..3).prop_map(|fields| {
        Value::map(std::iter::once(("type".to_owned(), Value::from("sync_request"))).chain(fields))
    });
    prop_oneof![any_value(), typed]
}

#[test]
fn inbound_frames_of_any_bytes_are_dropped_and_counted() {
    let rx = Receiver::new();
    let accepted = std::cell::Cell::new(0);
    let (_d, peer) = identity();
    check(
        "inbound_frames_of_any_bytes_are_dropped_and_counted",
        300,
        (
            prop_oneof![Just(transit::REQUEST), Just(transit::RESPONSE), any::<u8>()],
            bytes(200),
            plaintext(),
            mutation(),
        ),
        |(kind, body, plaintext, (at, with, how))| {
            let mut frame = vec![kind];
            frame.extend_from_slice(&body);
            prop_assert_eq!(rx.open(&frame), None);
            // A member's request with any plaintext: opened and decoded; an
            // envelope only if it is a map with a type, and then always
            // naming the verified sender and the proven network, whatever
            // the plaintext says.
            let payload = encoded(&plaintext);
            let sealed = event_crypto::seal_from(
                &peer,
                rx.identity.public_key(),
                &payload,
                Some((NET, &rx.key)),
            );
            let genuine = transit::wrap_request(&sealed);
            if let Some(env) = rx.open(&genuine) {
                accepted.set(accepted.get() + 1);
                prop_assert_eq!(
                    env.str("sender_peer_id").map(str::to_owned),
                    Some(peer.peer_id())
                );
                prop_assert_eq!(env.plaintext(), Some(&plaintext));
                prop_assert_eq!(env.str("network_id"), Some(NET));
                prop_assert_eq!(env.get("in_response_to"), None);
            }
            let mutated = mutate(genuine.clone(), at, with, how);
            if mutated != genuine {
                prop_assert_eq!(rx.open(&mutated), None);
            }
            let total: i64 = rx.drops().values().sum();
            prop_assert!(total >= 1, "a drop was not counted");
            Ok(())
        },
    );
    assert!(accepted.get() > 0, "no generated plaintext was accepted");
}

#[test]
fn frames_of_another_wire_version_are_dropped_as_such() {
    let rx = Receiver::new();
    let (_d, peer) = identity();
    let sealed = event_crypto::seal_from(
        &peer,
        rx.identity.public_key(),
        &encoded(&request(NET, &peer.peer_id())),
        Some((NET, &rx.key)),
    );
    let genuine = transit::wrap_request(&sealed);
    assert!(rx.open(&genuine).is_some());
    rx.drops();
    // The same request as a host before wire versions (tag 0x01), or a
    // later version, would send it: a version mismatch, not junk.
    for tag in [
        0x01,
        0x02,
        transit::REQUEST + 0x10,
        transit::RESPONSE + 0x10,
    ] {
        let mut frame = genuine.clone();
        frame[0] = tag;
        rx.refuses(&frame, "drop_wire_version");
    }
    // A byte that is no tag of any version stays junk.
    let mut frame = genuine.clone();
    frame[0] = transit::REQUEST + 2;
    rx.refuses(&frame, "drop_malformed_frame");
    assert_eq!(
        transit::wire_version(transit::REQUEST),
        Some(transit::WIRE_VERSION)
    );
}

#[test]
fn a_request_claiming_another_peers_id_is_dropped_or_names_its_real_sender() {
    let rx = Receiver::new();
    let (_d, alice) = identity();
    let (_d2, mallory) = identity();
    // Mallory swaps in Alice's public key as the sender: the proof fails.
    let payload = encoded(&request(NET, &alice.peer_id()));
    let honest = event_crypto::seal_from(
        &mallory,
        rx.identity.public_key(),
        &payload,
        Some((NET, &rx.key)),
    );
    let inner =
        codec::decode(&event_crypto::open(rx.identity.secret_key(), &honest).unwrap()).unwrap();
    let Value::Map(mut fields) = inner else {
        panic!("seal_from writes a map")
    };
    for f in fields.iter_mut().filter(|f| f.key.as_str() == "s") {
        f.value = Value::from(alice.public_key().as_bytes().as_slice());
    }
    let forged = event_crypto::seal(rx.identity.public_key(), &encoded(&Value::Map(fields)));
    rx.refuses(&transit::wrap_request(&forged), "drop_bad_sender_proof");
    // Sealed by Mallory as herself, the plaintext claiming Alice: the host
    // names Mallory as the sender, and plugins take the sender from there,
    // never from the plaintext.
    let env = rx.open(&transit::wrap_request(&honest)).unwrap();
    assert_eq!(env.str("sender_peer_id"), Some(mallory.peer_id().as_str()));
    assert_ne!(env.str("sender_peer_id"), Some(alice.peer_id().as_str()));
}

#[test]
fn a_replayed_request_is_dropped_and_a_stale_one_buys_no_trust() {
    let rx = Receiver::new();
    let (_d, member) = identity();
    let sealed = |sent_ms: i64| {
        let plaintext = Value::map([
            ("type", Value::from("sync_request")),
            ("timestamp_ms", Value::from(sent_ms)),
        ]);
        transit::wrap_request(&event_crypto::seal_from(
            &member,
            rx.identity.public_key(),
            &encoded(&plaintext),
            Some((NET, &rx.key)),
        ))
    };
    // A fresh request is opened, and makes its connection trusted.
    let fresh = sealed(db::now_ms());
    let env = rx.open(&fresh).unwrap();
    assert!(rx.inbound.grants_trust(&env));
    // The same bytes again, as captured and replayed: dropped.
    rx.refuses(&fresh, "drop_replayed_frame");
    // A request captured long ago (past the window replays are remembered
    // in) still authenticates, and reaches the plugins, which refuse it by
    // its timestamp; it never makes the connection trusted.
    let stale = rx.open(&sealed(db::now_ms() - 10 * 60_000)).unwrap();
    assert!(!rx.inbound.grants_trust(&stale));
    let undated = transit::wrap_request(&event_crypto::seal_from(
        &member,
        rx.identity.public_key(),
        &encoded(&request(NET, &member.peer_id())),
        Some((NET, &rx.key)),
    ));
    assert!(!rx.inbound.grants_trust(&rx.open(&undated).unwrap()));
    // A stranger (no network key) cannot fill the memory of requests seen:
    // its frames are refused as non-members' before they are remembered.
    let (_d3, stranger) = identity();
    let theirs = transit::wrap_request(&event_crypto::seal_from(
        &stranger,
        rx.identity.public_key(),
        &encoded(&request(NET, &stranger.peer_id())),
        Some((NET, &NetworkKey([9; 32]))),
    ));
    rx.refuses(&theirs, "drop_not_a_member");
    rx.refuses(&theirs, "drop_not_a_member");
}

#[test]
fn a_members_request_of_an_oversized_or_unprintable_type_is_dropped() {
    let rx = Receiver::new();
    let (_d, member) = identity();
    let long = "t".repeat(1 << 20);
    for bad in [long.as_str(), "a\nquiet-host running", "", "sync\u{1b}[2K"] {
        let plaintext = Value::map([("type", Value::from(bad))]);
        let frame = transit::wrap_request(&event_crypto::seal_from(
            &member,
            rx.identity.public_key(),
            &encoded(&plaintext),
            Some((NET, &rx.key)),
        ));
        rx.refuses(&frame, "drop_malformed_payload");
    }
}

#[test]
fn a_member_sending_requests_past_its_rate_is_dropped_and_others_are_not() {
    let rx = Receiver::new();
    let (_d, flooder) = identity();
    let (_d2, honest) = identity();
    let frame = |who: &HostIdentity, i: i64| {
        let plaintext = Value::map([("type", Value::from("sync_request")), ("n", Value::from(i))]);
        transit::wrap_request(&event_crypto::seal_from(
            who,
            rx.identity.public_key(),
            &encoded(&plaintext),
            Some((NET, &rx.key)),
        ))
    };
    // The host's clock stands still on this thread, as a simulator's does.
    let start = db::now_ms();
    db::set_thread_clock(Some(start));
    let frames: Vec<Vec<u8>> = (0..600).map(|i| frame(&flooder, i)).collect();
    let opened = frames.iter().filter(|f| rx.open(f).is_some()).count();
    assert_eq!(opened, 400, "its burst");
    assert_eq!(rx.drops().get("drop_sender_over_rate").copied(), Some(200));
    assert!(
        rx.open(&frame(&honest, 0)).is_some(),
        "another member was held up"
    );
    // A second later, a second's worth (200) more.
    db::set_thread_clock(Some(start + 1000));
    let more = (600..1000)
        .filter(|&i| rx.open(&frame(&flooder, i)).is_some())
        .count();
    db::set_thread_clock(None);
    assert_eq!(more, 200);
}

#[test]
fn a_response_is_worth_reading_only_if_it_names_a_live_request() {
    let rx = Receiver::new();
    let id = [7u8; 16];
    let mut head = vec![transit::RESPONSE];
    head.extend(id);
    assert!(!rx.inbound.answers_live_request(&head));
    rx.live.register(
        id,
        transit::Live {
            secret: [1; 32],
            peer_id: "ab".repeat(32),
            network_id: NET.into(),
        },
        db::now_ms(),
        30_000,
    );
    assert!(rx.inbound.answers_live_request(&head));
    head[5] ^= 1;
    assert!(!rx.inbound.answers_live_request(&head));
    assert!(!rx.inbound.answers_live_request(&head[..10]));
}

#[test]
fn messages_for_another_network_are_never_accepted() {
    let rx = Receiver::new();
    let (_d, peer) = identity();
    let to_rx = |plaintext: &Value, net: &str, key: &NetworkKey| {
        transit::wrap_request(&event_crypto::seal_from(
            &peer,
            rx.identity.public_key(),
            &encoded(plaintext),
            Some((net, key)),
        ))
    };
    // A network we are not in, even with a key the sender made up.
    rx.refuses(
        &to_rx(
            &request(NET_X, &peer.peer_id()),
            NET_X,
            &NetworkKey([9; 32]),
        ),
        "drop_not_a_member",
    );
    // Proven for NET_B, the payload naming NET: the envelope names the
    // network proven, whatever the payload says.
    let env = rx
        .open(&to_rx(&request(NET, &peer.peer_id()), NET_B, &rx.key_b))
        .unwrap();
    assert_eq!(env.str("network_id"), Some(NET_B));
    assert!(rx.drops().is_empty());
    // Claims NET, proven with NET_B's key.
    rx.refuses(
        &to_rx(&request(NET, &peer.peer_id()), NET, &rx.key_b),
        "drop_not_a_member",
    );
    // No network at all.
    let bare = event_crypto::seal_from(
        &peer,
        rx.identity.public_key(),
        &encoded(&request(NET, "x")),
        None,
    );
    rx.refuses(&transit::wrap_request(&bare), "drop_not_a_member");
    // The genuine article is heard.
    let env = rx.open(&to_rx(&request(NET, &peer.peer_id()), NET, &rx.key));
    assert_eq!(env.unwrap().str("network_id"), Some(NET));
}

#[test]
fn forged_replayed_and_late_responses_are_never_accepted() {
    let rx = Receiver::new();
    let (_d, responder) = identity();
    let (id, secret) = ([0x42u8; 16], [0x24u8; 32]);
    let asked = || transit::Live {
        secret,
        peer_id: responder.peer_id(),
        network_id: NET.into(),
    };
    rx.live.register(id, asked(), db::now_ms(), 30_000);
    let response = |key: &NetworkKey, secret: &[u8; 32]| {
        let plaintext = Value::map([("type", Value::from("sync_response"))]);
        let body = event_crypto::with_member_proof(key, &encoded(&plaintext));
        transit::wrap_response(id, secret, &body)
    };
    // Without the transit secret; to a request we never made.
    rx.refuses(&response(&rx.key, &[0; 32]), "drop_bad_transit_secret");
    let mut unknown = response(&rx.key, &secret);
    unknown[1] ^= 1;
    rx.refuses(&unknown, "drop_unknown_or_expired_request");
    // Re-labelled: the id in clear no longer matches the id inside.
    rx.live.register([0x43; 16], asked(), db::now_ms(), 30_000);
    let mut relabelled = response(&rx.key, &secret);
    relabelled[1..17].copy_from_slice(&[0x43; 16]);
    rx.refuses(&relabelled, "drop_bad_transit_secret");
    // The genuine response, once, named as from the peer we asked, about
    // the network we asked about; its replay finds no live request.
    let genuine = response(&rx.key, &secret);
    let env = rx.open(&genuine).expect("the genuine response");
    assert_eq!(env.str("in_response_to"), Some(hex::encode(id).as_str()));
    assert_eq!(
        env.str("sender_peer_id"),
        Some(responder.peer_id().as_str())
    );
    assert_eq!(env.str("network_id"), Some(NET));
    rx.refuses(&genuine, "drop_unknown_or_expired_request");
    // One arriving after its transit secret expired.
    rx.live.register(id, asked(), db::now_ms() - 31_000, 30_000);
    rx.refuses(
        &response(&rx.key, &secret),
        "drop_unknown_or_expired_request",
    );
    // From a responder that does not hold the network key: the transit
    // secret is used up, the payload refused.
    rx.live.register(id, asked(), db::now_ms(), 30_000);
    rx.refuses(
        &response(&NetworkKey([9; 32]), &secret),
        "drop_not_a_member",
    );
    // Too short to carry a membership proof.
    rx.live.register(id, asked(), db::now_ms(), 30_000);
    rx.refuses(
        &transit::wrap_response(id, &secret, &[0; 31]),
        "drop_malformed_payload",
    );
}

// ---- jobs.yaml -----------------------------------------------------------

/// YAML-looking text: fragments of real jobs files, in any order.
fn yaml() -> impl Strategy<Value = String> {
    let fragment = prop::sample::select(vec![
        "jobs:\n",
        "  - name: a\n",
        "    name: b\n",
        "    handler: sync\n",
        "    frequency_ms: 100\n",
        "    frequency_ms: 99\n",
        "    frequency_ms: 1e400\n",
        "    frequency_ms: -1\n",
        "    enabled: false\n",
        "    params:\n",
        "      x: [1, {a: b}]\n",
        "      y: !!binary aGk=\n",
        "  - &a {name: c, handler: h, frequency_ms: 1000}\n",
        "  - *a\n",
        "  - <<: *a\n",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "\"",
        "'",
        "\t",
        "\n",
        "#",
        "---\n",
        "...\n",
        "~",
        "\u{feff}",
        "\\u0000",
        "é",
    ]);
    prop_oneof![
        prop::collection::vec(fragment, 0..24).prop_map(|f| f.concat()),
        any::<String>(),
    ]
}

#[test]
fn jobs_yaml_of_any_text_is_parsed_or_refused_with_one_line() {
    check(
        "jobs_yaml_of_any_text_is_parsed_or_refused_with_one_line",
        1000,
        yaml(),
        |text| {
            match jobs::parse(&text, Path::new("jobs.yaml")) {
                Ok(config) => {
                    for (i, job) in config.jobs.iter().enumerate() {
                        prop_assert!(job.frequency_ms >= jobs::MIN_FREQUENCY_MS);
                        prop_assert!(matches!(job.params, Value::Map(_)));
                        prop_assert!(config.jobs[..i].iter().all(|j| j.name != job.name));
                    }
                }
                Err(e) => {
                    let line = e.to_string();
                    prop_assert!(line.starts_with("jobs.yaml"), "{}", line);
                    prop_assert!(!line.contains('\n'), "{}", line);
                }
            }
            Ok(())
        },
    );
}

// ---- envelopes across the plugin ABI ------------------------------------

/// Sends back whatever it is given, so that the test sees the envelope
/// after it crossed the ABI both ways.
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

#[test]
fn any_envelope_crosses_the_abi_unchanged() {
    check(
        "any_envelope_crosses_the_abi_unchanged",
        300,
        envelope(&["mirror"]),
        |mut env| {
            let mut host = TestHost::new(plugin_module()).unwrap();
            // Outgoing envelopes bypass handlers; that is not this test.
            env.remove("is_outgoing");
            if env.event_type() != Some("mirror") {
                // Routed nowhere: dead-lettered, not lost.
                host.deliver(vec![env]).unwrap();
                prop_assert_eq!(host.dead_letters().len(), 1);
                return Ok(());
            }
            host.deliver(vec![env.clone()]).unwrap();
            prop_assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
            let mut sent = host.take_sent();
            prop_assert_eq!(sent.len(), 1);
            let mut back = sent.pop().unwrap();
            prop_assert_eq!(back.remove("is_outgoing"), Some(Value::from(true)));
            if !env.fields().any(|(_, v)| has_nan(v)) {
                // Except what only the host vouches for, which it removes
                // from whatever a plugin returns.
                let mut expected = env;
                expected.remove(field::AUTHOR);
                expected.remove(field::SENDER_PEER_ID);
                prop_assert_eq!(back, expected);
            }
            Ok(())
        },
    );
}
