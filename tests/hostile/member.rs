//! Attacks by a member: Mallory holds the network key, as anyone who ever
//! joined does, can make as many identities as she likes, and builds valid
//! frames with the host's own library.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use quiet_host::{
    crypto::{event_crypto, identity::HostIdentity, signed_event, transit},
    encoding::codec,
    storage::db::now_ms,
};
use quiet_plugin_api::Value;

use crate::{under_attack, Bounds, Stop, Target};

/// One of Mallory's identities.
pub struct Mallory {
    _dir: tempfile::TempDir,
    me: HostIdentity,
}

impl Mallory {
    /// A fresh identity.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let me = HostIdentity::load_or_create(dir.path()).unwrap();
        Self { _dir: dir, me }
    }

    /// A request frame to `target` in its network, from this identity,
    /// sealed now.
    pub fn request(&self, target: &Target, plaintext: &Value) -> Vec<u8> {
        transit::wrap_request(&event_crypto::seal_from(
            &self.me,
            &target.key,
            &codec::encode(plaintext),
            Some((target.net.as_str(), &target.net_key)),
        ))
    }
}

/// A valid round 0 sync request, now, asking for answers at
/// 127.0.0.1:`reply_port`, made different from every other by `n`.
pub fn round_0(reply_port: u16, n: u64) -> Value {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    Value::map([
        ("type", Value::from("sync_request")),
        ("request_id", Value::from(id)),
        ("transit_secret", Value::from([5u8; 32])),
        ("timestamp_ms", Value::from(now_ms())),
        ("reply_ip", Value::from("127.0.0.1")),
        ("reply_port", Value::from(i64::from(reply_port))),
        ("session_id", Value::from(id)),
        ("round", Value::from(0)),
    ])
}

/// Writes `frame` with its length prefix; false once the host hung up.
pub fn write_frame(s: &mut TcpStream, frame: &[u8]) -> bool {
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .and_then(|()| s.write_all(frame))
        .is_ok()
}

/// A port nobody listens on: bound, then closed.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mallory joins A's syncing and answers each sync request A sends her
/// with `answer(request)`: she asks A once, from a port she listens on,
/// so A keeps her address and syncs with her every interval. Returns how
/// many requests she answered, once `stop`.
fn answer_every_request(
    target: &Target,
    stop: &Stop,
    answer: impl Fn(&Value) -> Vec<(&'static str, Value)> + Send + Sync + 'static,
) -> usize {
    let mallory = Arc::new(Mallory::new());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    {
        let (mallory, target, answered) = (mallory.clone(), target.clone(), answered.clone());
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (mallory, target, answered, answer) = (
                    mallory.clone(),
                    target.clone(),
                    answered.clone(),
                    answer.clone(),
                );
                thread::spawn(move || {
                    answer_on(conn, &mallory, &target, &answered, &*answer);
                });
            }
        });
    }
    let mut s = TcpStream::connect(&target.addr).unwrap();
    write_frame(&mut s, &mallory.request(target, &round_0(port, 0)));
    stop.wait();
    answered.load(Ordering::Relaxed)
}

fn answer_on(
    mut conn: TcpStream,
    mallory: &Mallory,
    target: &Target,
    answered: &AtomicUsize,
    answer: &dyn Fn(&Value) -> Vec<(&'static str, Value)>,
) {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut len = [0u8; 4];
    while conn.read_exact(&mut len).is_ok() {
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        if conn.read_exact(&mut frame).is_err() {
            return;
        }
        // A's answers to Mallory's own request come this way too.
        if frame.first() != Some(&transit::REQUEST) {
            continue;
        }
        let Ok(opened) = event_crypto::open_from(&mallory.me, &frame[1..]) else {
            continue;
        };
        let request = codec::decode(&opened.payload).unwrap();
        let field = |k: &str| request.get(k).and_then(Value::as_bytes).unwrap().to_vec();
        let response = Value::map(
            [
                ("type", Value::from("sync_response")),
                ("session_id", Value::from(field("session_id"))),
            ]
            .into_iter()
            .chain(answer(&request)),
        );
        let body = event_crypto::with_member_proof(&target.net_key, &codec::encode(&response));
        let request_id: [u8; 16] = field("request_id").try_into().unwrap();
        let secret: [u8; 32] = field("transit_secret").try_into().unwrap();
        let mut back = TcpStream::connect(&target.addr).unwrap();
        write_frame(
            &mut back,
            &transit::wrap_response(request_id, &secret, &body),
        );
        answered.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_member_replaying_a_captured_request_and_flooding_fresh_ones_costs_only_itself() {
    let attacked = under_attack(
        "a member's replays and request flood",
        Bounds {
            // A member's frames are opened before its rate is known to be
            // passed; past it, its connection is not read until the rate
            // allows another (before that, 57-65 % of one core).
            cpu: 0.4,
            rss_growth_mib: 32,
            threads: 64,
        },
        |target, stop| {
            let mallory = Mallory::new();
            let reply = closed_port();
            let mut s = TcpStream::connect(&target.addr).unwrap();
            // One request, then 50 copies of it, as if captured off the wire.
            let captured = mallory.request(&target, &round_0(reply, 0));
            for _ in 0..=50 {
                write_frame(&mut s, &captured);
            }
            // Then fresh ones, as fast as one connection takes them.
            let mut n = 1;
            while !stop.now() && write_frame(&mut s, &mallory.request(&target, &round_0(reply, n)))
            {
                n += 1;
            }
        },
    );
    assert_eq!(
        attacked.counter("drop_replayed_frame"),
        50,
        "{:#}",
        attacked.counters
    );
    assert!(
        attacked.counter("drop_sender_over_rate") > 0,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn sixty_four_member_identities_flooding_requests_leave_the_honest_peer_served() {
    const IDENTITIES: usize = 64;
    const EACH: u64 = 300;
    let attacked = under_attack(
        "64 identities flooding requests",
        Bounds {
            cpu: 1.6,
            rss_growth_mib: 64,
            threads: 160,
        },
        |target, stop| {
            // Sealed before the flood, on as many threads as cores, so that
            // the attacker's sealing, on this machine, does not starve A.
            let reply = closed_port();
            let sealers: Vec<_> = (0..IDENTITIES)
                .map(|_| {
                    let target = target.clone();
                    thread::spawn(move || {
                        let mallory = Mallory::new();
                        (0..EACH)
                            .map(|n| mallory.request(&target, &round_0(reply, n)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let floods: Vec<_> = sealers
                .into_iter()
                .map(|s| {
                    let (frames, target, stop) = (s.join().unwrap(), target.clone(), stop.clone());
                    thread::spawn(move || {
                        let Ok(mut s) = TcpStream::connect(&target.addr) else {
                            return;
                        };
                        for frame in &frames {
                            if stop.now() || !write_frame(&mut s, frame) {
                                return;
                            }
                        }
                    })
                })
                .collect();
            for f in floods {
                f.join().unwrap();
            }
        },
    );
    assert!(
        attacked.counter("sync_rate_limited") > 0,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn requests_naming_a_new_reply_address_each_do_not_make_a_thread_each() {
    const IDENTITIES: usize = 128;
    let attacked = under_attack(
        "128 identities naming a new reply address in every request",
        Bounds {
            cpu: 0.6,
            rss_growth_mib: 64,
            threads: 200,
        },
        |target, stop| {
            let identities: Vec<Mallory> = (0..IDENTITIES).map(|_| Mallory::new()).collect();
            let mut s = TcpStream::connect(&target.addr).unwrap();
            // Ports nobody listens on, a new one in each request: before,
            // each answer made a sender thread that lived a minute.
            let mut port = 20_000u16;
            let mut n = 0;
            while !stop.now() {
                for mallory in &identities {
                    port = port.wrapping_add(1).max(20_000);
                    if !write_frame(&mut s, &mallory.request(&target, &round_0(port, n))) {
                        return;
                    }
                }
                n += 1;
                // Each identity may start a session every 3 s.
                thread::sleep(Duration::from_millis(3_100));
            }
        },
    );
    assert!(
        attacked.counter("send_failed") >= IDENTITIES as i64,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn a_member_answering_with_300_made_up_peers_adds_no_address() {
    let attacked = under_attack(
        "responses naming 300 made-up peers",
        Bounds {
            cpu: 0.3,
            rss_growth_mib: 32,
            threads: 64,
        },
        |target, stop| {
            let peers: Vec<Value> = (0..300u32)
                .map(|i| {
                    Value::map([
                        ("peer_id", Value::from(format!("{i:064x}"))),
                        ("ip", Value::from("192.0.2.1")),
                        ("port", Value::from(1 + i64::from(i))),
                    ])
                })
                .collect();
            let answered = answer_every_request(&target, &stop, move |_| {
                vec![("peers", Value::from(peers.clone()))]
            });
            assert!(answered >= 1, "A never asked Mallory");
        },
    );
    // A keeps B's address and Mallory's own, none of the 300, and at most
    // 16 of them as candidates to try.
    assert_eq!(attacked.a_query("SELECT COUNT(*) FROM addresses"), 2);
    assert!(attacked.a_query("SELECT COUNT(*) FROM sync_candidates") <= 16);
}

/// Events Mallory makes up: bodies whose types are too long, break lines
/// or hold escapes (built by hand: the library refuses to sign them), and
/// messages she signs whose text tries to rewrite the terminal.
fn hostile_events(target: &Target) -> Vec<Value> {
    let author = Mallory::new();
    let created_ms = now_ms();
    let message = |text: &str| {
        let content = codec::encode(&Value::map([("text", Value::from(text))]));
        let (_, event) = signed_event::seal_event_v3(
            author.me.signing(),
            &target.net,
            &target.net_key,
            created_ms,
            "message",
            &[],
            &content,
        )
        .unwrap();
        Value::from(event)
    };
    // signature ‖ created_ms ‖ author ‖ type_len ‖ type ‖ no deps ‖ content,
    // as docs/design/signed-events.md lays it out.
    let of_type = |event_type: &[u8]| {
        let mut inner = vec![0u8; 64];
        inner.extend_from_slice(&created_ms.to_be_bytes());
        inner.extend_from_slice(author.me.signing().peer_id());
        inner.push(event_type.len() as u8);
        inner.extend_from_slice(event_type);
        inner.push(0);
        inner.extend_from_slice(&codec::encode(&Value::map([("text", Value::from("x"))])));
        Value::from(signed_event::seal_inner(
            &target.net_key,
            created_ms,
            &inner,
        ))
    };
    vec![
        of_type(&[b't'; 255]),
        of_type(b"message\nengine ok"),
        of_type("\u{1b}[2Jmessage".as_bytes()),
        message("\r\u{1b}[1Ahello"),
        message("a short message"),
    ]
}

#[test]
fn events_of_hostile_types_and_authors_are_refused_or_shown_escaped() {
    let attacked = under_attack(
        "events of hostile types and authors",
        Bounds {
            cpu: 0.3,
            rss_growth_mib: 32,
            threads: 64,
        },
        |target, stop| {
            let events = hostile_events(&target);
            let answered = answer_every_request(&target, &stop, move |_| {
                vec![("events", Value::from(events.clone()))]
            });
            assert!(answered >= 1, "A never asked Mallory");
        },
    );
    // The three of bad types were never stored; the two messages were,
    // and reached B too (the harness checked A and B agree).
    assert!(
        attacked.counter("drop_malformed_event") >= 3,
        "{:#}",
        attacked.counters
    );
    assert_eq!(
        attacked.a_query("SELECT COUNT(*) FROM events WHERE length(event_type) > 64"),
        0
    );
    assert_eq!(
        attacked.a_query("SELECT COUNT(*) FROM dead_letters WHERE length(reason) > 1024"),
        0
    );
    let listed = attacked.a.cli(&["message", "list", &attacked.net]);
    let status = quiet_test_support::peers::cli(
        &crate::bin(),
        &attacked.a_dirs.data,
        &["status", "--dead-letters", "50"],
    );
    for (what, text) in [("message list", &listed), ("status", &status)] {
        assert!(
            !text.contains(['\u{1b}', '\u{7}', '\r']),
            "{what} printed a control character:\n{text:?}"
        );
    }
    assert!(listed.contains("a short message"), "{listed}");
}

#[test]
fn a_connection_that_authenticated_keeps_a_members_size_limit_after_a_frame_that_fails() {
    let bin = crate::bin();
    let (a_dirs, a) = quiet_test_support::peers::sync_host(&bin);
    let (_invite, net) = quiet_test_support::peers::create_network(&bin, &a_dirs.data);
    let target = Target::of(&a_dirs, &a, &net);
    let member = Mallory::new();
    let request = |n: i64, padding: usize| {
        member.request(
            &target,
            &Value::map([
                ("type", Value::from("sync_request")),
                ("n", Value::from(n)),
                ("timestamp_ms", Value::from(now_ms())),
                ("padding", Value::from(vec![0x5au8; padding])),
            ]),
        )
    };
    let mut s = TcpStream::connect(&target.addr).unwrap();
    // A fresh request authenticates the connection; then a frame that does
    // not open, as a late response to an expired request does not.
    write_frame(&mut s, &request(1, 0));
    let mut junk = vec![0x33u8; 1000];
    junk[0] = transit::REQUEST;
    write_frame(&mut s, &junk);
    // Then a request past a stranger's 64 KiB, within a member's 1 MiB,
    // and one more after it on the same connection.
    let large = request(2, 300 << 10);
    assert!(
        (64 << 10..=1 << 20).contains(&large.len()),
        "{}",
        large.len()
    );
    write_frame(&mut s, &large);
    write_frame(&mut s, &request(3, 0));

    // A has no peer: every frame it reads is one of these four.
    let counter = |c: &serde_json::Value, name: &str| c[name].as_i64().unwrap_or(0);
    let counters = quiet_test_support::wait_for(Duration::from_secs(10), || {
        let c = a.status()["counters"].clone();
        (counter(&c, "net_frames_received") >= 4).then_some(c)
    })
    .unwrap_or_else(|| panic!("A did not read all four: {}", a.status()["counters"]));
    assert_eq!(counter(&counters, "net_frames_received"), 4, "{counters:#}");
    assert_eq!(
        counter(&counters, "drop_oversized_frame"),
        0,
        "{counters:#}"
    );
    // The junk, and nothing else, failed to open.
    let failed: i64 = [
        "drop_bad_seal",
        "drop_malformed_payload",
        "drop_malformed_frame",
    ]
    .iter()
    .map(|c| counter(&counters, c))
    .sum();
    assert_eq!(failed, 1, "{counters:#}");
    // And A has kept the connection open: a read waits rather than ends.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    match s.read(&mut [0u8; 1]) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("A closed the connection: {other:?}; {counters:#}"),
    }
    a.stop();
}

/// A small request, fresh, that makes Mallory's connection trusted.
fn hello(mallory: &Mallory, target: &Target, n: i64) -> Vec<u8> {
    mallory.request(
        target,
        &Value::map([
            ("type", Value::from("sync_request")),
            ("n", Value::from(n)),
            ("timestamp_ms", Value::from(now_ms())),
        ]),
    )
}

#[test]
fn members_trickling_large_requests_hold_at_most_the_read_budget() {
    /// Members' connections, each its own identity.
    const TRICKLERS: usize = 200;
    /// What each sends of its 1 MiB request at once, before it trickles
    /// the rest a byte every half second: 200 of them send 188 MiB.
    const SENT_AT_ONCE: usize = 960 << 10;
    let attacked = under_attack(
        "200 members trickling 1 MiB requests",
        Bounds {
            cpu: 1.0,
            // The read budget is 64 MiB; the rest is room for the
            // allocator and 200 more readers' stacks. Before it, the
            // members held 1 MiB each (35 -> 257 MiB).
            rss_growth_mib: 96,
            threads: crate::MAX_THREADS,
        },
        |target, stop| {
            let members: Vec<_> = (0..TRICKLERS)
                .map(|_| {
                    let (target, stop) = (target.clone(), stop.clone());
                    // Joined one by one, so that at most a few at once are
                    // strangers to A (it holds 64 of those).
                    thread::sleep(Duration::from_millis(10));
                    thread::spawn(move || {
                        let mallory = Mallory::new();
                        let mut n = 0;
                        while !stop.now() {
                            n += 1;
                            let Ok(mut s) = TcpStream::connect(&target.addr) else {
                                thread::sleep(Duration::from_millis(500));
                                continue;
                            };
                            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                            let mut head = (1u32 << 20).to_be_bytes().to_vec();
                            head.push(transit::REQUEST);
                            let sent = write_frame(&mut s, &hello(&mallory, &target, n))
                                && s.write_all(&head).is_ok()
                                && s.write_all(&vec![n as u8; SENT_AT_ONCE]).is_ok();
                            while sent && !stop.now() && s.write_all(&[0]).is_ok() {
                                thread::sleep(Duration::from_millis(500));
                            }
                            thread::sleep(Duration::from_millis(500));
                        }
                    })
                })
                .collect();
            for m in members {
                m.join().unwrap();
            }
        },
    );
    assert!(
        attacked.counter("drop_read_budget") > 0,
        "{:#}",
        attacked.counters
    );
    assert_eq!(
        attacked.counter("drop_oversized_frame"),
        0,
        "{:#}",
        attacked.counters
    );
}
