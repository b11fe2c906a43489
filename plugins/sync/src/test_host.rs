//! What the unit tests share: hosts with the sync plugin loaded, peers
//! whose handler a test calls directly, and sessions carried between them
//! by hand. One copy, so that the tests beside each part of the plugin do
//! not repeat it, and the host's test paths are named in one place.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicI64, Ordering},
};

pub(crate) use quiet_host::storage::db::{now_ms, set_thread_clock};
use quiet_host::{plugins::context::HostContext, storage::statements::Statements};
use quiet_plugin_api::{envelope, Context, Envelope, FilterContext, Handler, Identity, Value};
pub(crate) use quiet_plugin_test_support::TestHost;

use crate::{limits::FRAME_SIZE_LIMIT, session::WINDOW, wire::random_bytes, SyncHandler};

pub(crate) const NET: &str = "net-1";
/// Peer ids, as the host writes them: 64 hex digits.
pub(crate) const PEER_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub(crate) const PEER_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
pub(crate) const PEER_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
pub(crate) const PEER_X: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
pub(crate) const PEER_Z: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
pub(crate) const PEER_OFF: &str =
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

pub(crate) fn host(listen: &str) -> TestHost {
    let host = TestHost::new(crate::plugin_module()).unwrap();
    host.join_network(NET);
    host.listen_on(listen);
    host
}

pub(crate) fn add_address(host: &TestHost, peer_id: &str, port: i64, active: bool) {
    host.add_peer(peer_id, NET, port, active);
}

/// The id of test event `i` of series `series`.
pub(crate) fn event_id(series: u8, i: u32) -> Vec<u8> {
    let mut id = vec![series; 32];
    id[..4].copy_from_slice(&i.to_be_bytes());
    id
}

/// Stores events `range` of `series`; event `i` is created at `1000 + i`.
pub(crate) fn add_events(host: &TestHost, series: u8, range: std::ops::Range<u32>) {
    let db = host.db();
    db.execute_batch("BEGIN").unwrap();
    for i in range {
        let event = format!("event {series}/{i}").into_bytes();
        host.add_event(&event_id(series, i), NET, 1000 + i64::from(i), &event);
    }
    db.execute_batch("COMMIT").unwrap();
}

pub(crate) fn counter(host: &TestHost, name: &str) -> i64 {
    host.count(&format!(
        "SELECT COALESCE((SELECT value FROM counters WHERE name = '{name}'), 0)"
    ))
}

pub(crate) fn limits(max_events: i64) -> Value {
    Value::map([
        ("max_events_per_response", max_events),
        ("transit_secret_ttl_ms", 30_000),
    ])
}

/// A request as the host hands it to the responder ("test-peer") after
/// opening it: from `peer`, whose identity the host verified.
pub(crate) fn request_from(
    peer: &str,
    session_id: [u8; 16],
    round: i64,
    need: Vec<Value>,
) -> Envelope {
    envelope! {
        "event_type" => "sync_request",
        "is_outgoing" => false,
        "sender_peer_id" => peer,
        "network_id" => NET,
        "event_plaintext" => Value::map([
            ("type", Value::from("sync_request")),
            ("request_id", new_id().into()),
            ("transit_secret", [7u8; 32].into()),
            ("timestamp_ms", timestamp().into()),
            ("reply_ip", "10.0.0.9".into()),
            ("reply_port", 7009.into()),
            ("session_id", session_id.into()),
            ("round", round.into()),
            ("negentropy", Value::Bytes(Default::default())),
            ("need", need.into()),
        ]),
    }
}

/// A fresh request or session id.
pub(crate) fn new_id() -> [u8; 16] {
    random_bytes()
}

/// Now, and later with each call, as a requester's timestamps are.
pub(crate) fn timestamp() -> i64 {
    static CALLS: AtomicI64 = AtomicI64::new(0);
    now_ms() + CALLS.fetch_add(1, Ordering::Relaxed)
}

/// `env` with its plaintext's `key` set to `value`.
pub(crate) fn with_field(mut env: Envelope, key: &str, value: impl Into<Value>) -> Envelope {
    let p = env.plaintext().unwrap().as_map().unwrap();
    let fields = p
        .iter()
        .filter(|f| f.key.as_str() != key)
        .map(|f| (f.key.clone(), f.value.clone()))
        .chain([(key.into(), value.into())]);
    env.set("event_plaintext", Value::map(fields));
    env
}

/// What the receiving host makes of `out` once it has crossed the
/// network from `sender`.
pub(crate) fn arrived(out: &Envelope, sender: &str) -> Envelope {
    let mut env = Envelope::of_type(out.event_type().unwrap())
        .with("is_outgoing", false)
        .with("sender_peer_id", sender)
        .with("network_id", out.str("network_id").unwrap())
        .with("event_plaintext", out.plaintext().unwrap());
    if let Some(id) = out.str("in_response_to") {
        env.set("in_response_to", id);
    }
    env
}

pub(crate) fn plaintext<'a>(env: &'a Envelope, key: &str) -> &'a Value {
    env.plaintext().unwrap().get(key).unwrap_or(&Value::Null)
}

/// A list field of `env`'s plaintext; a missing one is empty.
pub(crate) fn list<'a>(env: &'a Envelope, key: &str) -> &'a [Value] {
    let value = plaintext(env, key);
    if value.is_null() {
        &[]
    } else {
        value.as_list().unwrap()
    }
}

/// A host with its own peer id, whose handler the test calls directly
/// (TestHost's identity is fixed, and two parties need two ids).
pub(crate) struct Peer {
    pub(crate) host: TestHost,
    pub(crate) handler: SyncHandler,
    pub(crate) identity: Identity,
}

impl Peer {
    pub(crate) fn new(peer_id: &str, port: i64) -> Self {
        Self {
            host: host(&format!("127.0.0.1:{port}")),
            handler: SyncHandler::default(),
            identity: Identity {
                peer_id: peer_id.into(),
                public_key: vec![0u8; 32].into(),
            },
        }
    }

    /// Runs the job, ignoring the per-peer schedule of new sessions:
    /// tests run sessions back to back, faster than it allows.
    pub(crate) fn run_job(&self, params: &Value) -> Vec<Envelope> {
        self.handler.state().next_start_ms.clear();
        self.with_ctx(|ctx| self.handler.run_job(ctx, params).unwrap())
    }

    pub(crate) fn process(&self, env: &Envelope) -> Vec<Envelope> {
        self.with_ctx(|ctx| {
            assert!(self
                .handler
                .filter(env, &FilterContext::new(Value::EMPTY_MAP)));
            self.handler.process(env, ctx).unwrap()
        })
    }

    /// Calls `f` with a context on this peer's host, as the host calls
    /// the handler.
    pub(crate) fn with_ctx<T>(&self, f: impl FnOnce(&mut Context<'_>) -> T) -> T {
        let statements = Statements::new(self.host.db());
        let mut services = HostContext::new(&statements, "sync", &self.identity, None);
        let mut ctx = Context::new(services.as_abi(), Value::EMPTY_MAP);
        f(&mut ctx)
    }
}

pub(crate) struct Outcome {
    /// Event bytes A was given to store, in order.
    pub(crate) stored: Vec<Vec<u8>>,
    pub(crate) rounds: usize,
    /// Sessions B opened with A because A said B was behind.
    pub(crate) reverse: usize,
}

/// Runs one session of A pulling from B, shuttling envelopes by hand,
/// until A sends nothing more.
pub(crate) fn session(a: &Peer, b: &Peer, max_events: usize) -> Outcome {
    session_losing(a, b, max_events, |_| false)
}

/// [`session`], losing B's response to each request that `lose` picks.
pub(crate) fn session_losing(
    a: &Peer,
    b: &Peer,
    max_events: usize,
    lose: impl Fn(&Envelope) -> bool,
) -> Outcome {
    let mut requests = a.run_job(&limits(max_events as i64));
    requests.retain(|r| r.str("seal_to") == Some(PEER_B)); // not peer-c
    assert_eq!(requests.len(), 1);
    exchange(a, b, requests, max_events, lose)
}

/// Carries `requests` of A's session to B and back until nothing is
/// left to send, losing B's response to each request `lose` picks.
pub(crate) fn exchange(
    a: &Peer,
    b: &Peer,
    requests: Vec<Envelope>,
    max_events: usize,
    lose: impl Fn(&Envelope) -> bool,
) -> Outcome {
    let mut out = Outcome {
        stored: Vec::new(),
        rounds: 0,
        reverse: 0,
    };
    // First in, first out: requests travel in order on one connection.
    let first_round = requests
        .first()
        .and_then(|r| plaintext(r, "round").as_int())
        .unwrap_or(0);
    let mut requests: VecDeque<Envelope> = requests.into();
    while let Some(request) = requests.pop_front() {
        out.rounds += 1;
        assert!(out.rounds < 100, "the session does not end");
        assert_eq!(
            plaintext(&request, "round").as_int(),
            Some(first_round + out.rounds as i64 - 1)
        );
        assert!(list(&request, "need").len() <= max_events);
        // B answers every round; told that it is behind, it also opens
        // its own session with A, which is not followed here.
        let mut responses = b.process(&arrived(&request, PEER_A));
        let reverse = responses.iter().skip(1);
        assert!(reverse
            .clone()
            .all(|r| r.event_type() == Some("sync_request")));
        out.reverse += reverse.count();
        responses.truncate(1);
        assert_eq!(responses[0].event_type(), Some("sync_response"));
        if lose(&request) {
            continue;
        }
        let events = list(&responses[0], "events");
        assert!(events.len() <= max_events);
        for env in a.process(&arrived(&responses[0], PEER_B)) {
            match env.event_type() {
                Some("store_event") => {
                    assert_eq!(env.str("network_id"), Some(NET));
                    out.stored
                        .push(env.bytes("event_ciphertext").unwrap().to_vec());
                }
                Some("sync_request") => requests.push_back(env),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(requests.len() <= WINDOW);
        // Reconciliation waits while a window's worth of ids is queued,
        // so the queue holds at most that plus one reply's ids.
        let queued = a
            .handler
            .state()
            .sessions
            .values()
            .map(|s| s.needs.len())
            .max();
        let bound = WINDOW * max_events + FRAME_SIZE_LIMIT as usize / 32;
        assert!(queued.unwrap_or(0) <= bound, "{queued:?} ids queued");
    }
    out
}

pub(crate) fn two_peers() -> (Peer, Peer) {
    let a = Peer::new(PEER_A, 7001);
    let b = Peer::new(PEER_B, 7002);
    add_address(&a.host, PEER_B, 7002, true);
    add_address(&b.host, PEER_C, 7003, true);
    b.run_job(&limits(1000)); // B's responder limits; B's own request is ignored
    (a, b)
}

pub(crate) fn event_bytes(series: u8, range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("event {series}/{i}").into_bytes())
        .collect()
}

/// `stored`, sorted, once it is checked that no event in it came twice.
pub(crate) fn each_once(mut stored: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let count = stored.len();
    stored.sort();
    stored.dedup();
    assert_eq!(stored.len(), count, "no event is sent twice");
    stored
}

/// Whether A recorded a completed session with B.
pub(crate) fn synced_with_b(a: &Peer) -> bool {
    a.host.count(&format!(
        "SELECT last_sync_ms FROM addresses WHERE peer_id = '{PEER_B}'"
    )) > 0
}

/// The rows of `table` (addresses or candidates), "peer ip port" in
/// peer order, joined by ", ".
pub(crate) fn listed(host: &TestHost, table: &str) -> String {
    host.db()
        .query_row(
            &format!(
                "SELECT COALESCE(group_concat(peer_id || ' ' || ip || ' ' || port, ', '), '') \
                 FROM (SELECT * FROM {table} ORDER BY peer_id, ip, port)"
            ),
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// A peer as a response lists it.
pub(crate) fn named(peer_id: &str, ip: &str, port: i64) -> Value {
    Value::map([
        ("peer_id", Value::from(peer_id)),
        ("ip", ip.into()),
        ("port", port.into()),
    ])
}

/// A well-formed peer id that no host has.
pub(crate) fn made_up_peer(i: u32) -> String {
    format!("{i:064x}")
}

/// A minimal answer to `request` that names `peers`, as the requester's
/// host hands it over: from the peer the request was sealed to (the only
/// one that could answer it).
pub(crate) fn answer(request: &Envelope, peers: Vec<Value>) -> Envelope {
    let request_id = plaintext(request, "request_id").as_bytes().unwrap();
    envelope! {
        "event_type" => "sync_response",
        "is_outgoing" => false,
        "in_response_to" => hex::encode(request_id),
        "sender_peer_id" => request.str("seal_to").unwrap(),
        "network_id" => request.str("network_id").unwrap(),
        "event_plaintext" => Value::map([
            ("type", Value::from("sync_response")),
            ("session_id", plaintext(request, "session_id").clone()),
            ("peers", peers.into()),
        ]),
    }
}

/// The requests of `sent` sealed to `peer`.
pub(crate) fn to<'a>(sent: &'a [Envelope], peer: &str) -> Vec<&'a Envelope> {
    sent.iter()
        .filter(|r| r.str("seal_to") == Some(peer))
        .collect()
}
