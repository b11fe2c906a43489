//! Encrypted sync between real `quiet-host` processes on loopback, each with
//! its own data folder, with the real sync and messages plugins.

use std::{
    collections::HashSet,
    io::Write,
    net::TcpStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

pub(crate) use quiet_test_support::peers::events;
use quiet_test_support::{peers, wait_for, HostDirs, HostProcess};

use crate::{bin, query_i64};

/// A listening host with the sync and messages plugins.
pub(crate) fn sync_host() -> (HostDirs, HostProcess) {
    peers::sync_host(&bin())
}

/// Two listening hosts in one network, synced once; see
/// [`peers::synced_pair`].
pub(crate) fn synced_pair() -> (HostDirs, HostProcess, HostDirs, HostProcess, String) {
    peers::synced_pair(&bin())
}

/// Runs a CLI command on a data folder; returns its stdout, trimmed.
pub(crate) fn cli(data: &Path, args: &[&str]) -> String {
    peers::cli(&bin(), data, args)
}

/// Event ids of a network's messages, in `message list` order.
pub(crate) fn message_ids(data: &Path, network: &str) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&cli(data, &["message", "list", network, "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|m| m["event_id"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) fn create_network(data: &Path) -> (String, String) {
    peers::create_network(&bin(), data)
}

/// Sends `n` messages (`text(i)`) on a running host and waits until it
/// has stored them all; returns their event ids.
pub(crate) fn fill(
    data: &Path,
    network: &str,
    n: usize,
    text: impl Fn(usize) -> String,
) -> Vec<String> {
    let texts: Vec<String> = (0..n).map(text).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = quiet_host::cli::commands::message_send_many(data, network, &texts).unwrap();
    wait_for(Duration::from_secs(60), || {
        (events(data, network) == n as i64).then_some(())
    })
    .expect("the host did not store its own messages");
    ids
}

fn counter(status: &serde_json::Value, name: &str) -> i64 {
    status["counters"][name].as_i64().unwrap_or(0)
}

fn last_sync_with(status: &serde_json::Value, peer: &str) -> Option<i64> {
    status["networks"]
        .as_array()?
        .iter()
        .flat_map(|n| n["peers"].as_array().cloned().unwrap_or_default())
        .find(|p| p["peer_id"] == peer)?["last_sync_ms"]
        .as_i64()
}

#[test]
fn three_hosts_converge_and_the_first_and_last_sync_directly() {
    let (a_dirs, a) = sync_host();
    let (b_dirs, b) = sync_host();
    let (c_dirs, c) = sync_host();
    let (invite_a, net) = create_network(&a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite_a]);
    let invite_b = cli(&b_dirs.data, &["network", "invite", &net]);
    cli(&c_dirs.data, &["network", "join", &invite_b]);
    let started = Instant::now();
    for (dirs, who) in [(&a_dirs, "a"), (&b_dirs, "b"), (&c_dirs, "c")] {
        for i in 0..3 {
            cli(
                &dirs.data,
                &["message", "send", &net, &format!("{who} says {i}")],
            );
        }
    }

    let converged = wait_for(Duration::from_secs(60), || {
        let lists: Vec<Vec<String>> = [&a_dirs, &b_dirs, &c_dirs]
            .iter()
            .map(|d| message_ids(&d.data, &net))
            .collect();
        (lists[0].len() == 9 && lists.iter().all(|l| *l == lists[0])).then_some(())
    });
    assert!(
        converged.is_some(),
        "no convergence; a: {:?}\nb: {:?}\nc: {:?}\nlog a:\n{}",
        message_ids(&a_dirs.data, &net),
        message_ids(&b_dirs.data, &net),
        message_ids(&c_dirs.data, &net),
        a.log().join("\n")
    );
    eprintln!(
        "three hosts converged on 9 messages in {:?}",
        started.elapsed()
    );

    // A and C only knew B at first; they must have learned each other and
    // synced directly.
    let direct = wait_for(Duration::from_secs(30), || {
        let (sa, sc) = (a.status(), c.status());
        let (pa, pc) = (
            sa["peer_id"].as_str()?.to_owned(),
            sc["peer_id"].as_str()?.to_owned(),
        );
        (last_sync_with(&sa, &pc).is_some() || last_sync_with(&sc, &pa).is_some()).then_some(())
    });
    assert!(direct.is_some(), "A and C never synced directly");
    // Sync requests are never stored: only the nine messages are.
    for d in [&a_dirs, &b_dirs, &c_dirs] {
        assert_eq!(events(&d.data, &net), 9);
        assert_eq!(
            query_i64(&d.data, "SELECT COUNT(*) FROM dead_letters").unwrap(),
            0
        );
    }
    for h in [a, b, c] {
        h.stop();
    }
}

#[test]
fn ten_thousand_messages_reach_a_fresh_peer_with_none_missing_or_doubled() {
    const N: usize = 10_000;
    let (a_dirs, a) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    let sent: HashSet<String> = fill(&a_dirs.data, &net, N, |i| {
        format!("message {i:05} {}", "x".repeat(900))
    })
    .into_iter()
    .collect();
    assert_eq!(sent.len(), N);

    let (b_dirs, b) = sync_host();
    let started = Instant::now();
    cli(&b_dirs.data, &["network", "join", &invite]);
    let done = wait_for(Duration::from_secs(120), || {
        (events(&b_dirs.data, &net) == N as i64).then_some(())
    });
    let took = started.elapsed();
    assert!(
        done.is_some(),
        "B has {} of {N} events after {took:?}",
        events(&b_dirs.data, &net)
    );
    eprintln!(
        "{N} messages (10x max_events_per_response) reached a fresh peer in {took:?} ({:.0} events/s, debug build)",
        N as f64 / took.as_secs_f64()
    );
    let got = message_ids(&b_dirs.data, &net);
    assert_eq!(got.len(), N, "projected messages");
    assert_eq!(
        got.iter().cloned().collect::<HashSet<_>>(),
        sent,
        "the same ids"
    );
    a.stop();
    b.stop();
}

#[test]
fn networks_are_isolated() {
    let (a_dirs, a) = sync_host();
    let (b_dirs, b) = sync_host();
    let (c_dirs, c) = sync_host();
    let (invite1, net1) = create_network(&a_dirs.data);
    let (invite2, net2) = create_network(&a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite1]);
    cli(&c_dirs.data, &["network", "join", &invite2]);
    cli(&a_dirs.data, &["message", "send", &net1, "for network one"]);
    cli(&a_dirs.data, &["message", "send", &net2, "for network two"]);
    cli(&b_dirs.data, &["message", "send", &net1, "b in one"]);
    cli(&c_dirs.data, &["message", "send", &net2, "c in two"]);

    let ok = wait_for(Duration::from_secs(60), || {
        (events(&b_dirs.data, &net1) == 2
            && events(&c_dirs.data, &net2) == 2
            && events(&a_dirs.data, &net1) == 2
            && events(&a_dirs.data, &net2) == 2)
            .then_some(())
    });
    assert!(ok.is_some(), "no convergence within each network");
    // Give a few more rounds a chance to leak, then check nothing did.
    std::thread::sleep(Duration::from_secs(4));
    // Each holds its own network's: two messages and the genesis.
    for (who, data) in [("B", &b_dirs.data), ("C", &c_dirs.data)] {
        assert_eq!(
            query_i64(data, "SELECT COUNT(*) FROM events").unwrap(),
            3,
            "{who} holds events of the other network"
        );
    }
    assert_eq!(
        query_i64(
            &b_dirs.data,
            &format!("SELECT COUNT(*) FROM events WHERE network_id = '{net2}'")
        )
        .unwrap(),
        0
    );
    for h in [a, b, c] {
        h.stop();
    }
}

#[test]
fn a_host_restarted_mid_sync_resumes_and_converges() {
    const N: usize = 5_000;
    let (a_dirs, a) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    fill(&a_dirs.data, &net, N, |i| format!("restart {i}"));

    let (b_dirs, b) = sync_host();
    cli(&b_dirs.data, &["network", "join", &invite]);
    let partial = wait_for(Duration::from_secs(60), || {
        let n = events(&b_dirs.data, &net);
        (n > 0).then_some(n)
    })
    .expect("B never started receiving");
    b.stop();
    let at_stop = events(&b_dirs.data, &net);
    eprintln!("B stopped holding {at_stop} of {N} (first seen {partial})");

    let b = HostProcess::start_listening(&bin(), &b_dirs);
    let done = wait_for(Duration::from_secs(120), || {
        (events(&b_dirs.data, &net) == N as i64).then_some(())
    });
    assert!(
        done.is_some(),
        "B has {} of {N} after restart",
        events(&b_dirs.data, &net)
    );
    // Each once: an event id is the table's primary key.
    assert_eq!(events(&b_dirs.data, &net), N as i64);
    assert_eq!(message_ids(&b_dirs.data, &net).len(), N);
    a.stop();
    b.stop();
}

/// A hand-made round 0 sync request, now, asking for answers at
/// 127.0.0.1:`reply_port`.
pub(crate) fn round_0_request(reply_port: u16) -> quiet_plugin_api::Value {
    use quiet_plugin_api::Value;
    Value::map([
        ("type", Value::from("sync_request")),
        ("request_id", Value::from([0u8; 16])),
        ("transit_secret", Value::from([5u8; 32])),
        (
            "timestamp_ms",
            Value::from(quiet_host::storage::db::now_ms()),
        ),
        ("reply_ip", Value::from("127.0.0.1")),
        ("reply_port", Value::from(i64::from(reply_port))),
        ("session_id", Value::from([0xabu8; 16])),
        ("round", Value::from(0)),
    ])
}

/// Sends one raw frame (length prefix and bytes) to `addr`.
pub(crate) fn send_raw(addr: &str, frame: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
    s.write_all(frame).unwrap();
}

#[test]
fn bad_packets_are_dropped_counted_and_change_nothing() {
    use quiet_host::crypto::{event_crypto, identity::HostIdentity, transit};
    use quiet_plugin_api::Value;

    let (a_dirs, a) = sync_host();
    let (_invite, net) = create_network(&a_dirs.data);
    cli(&a_dirs.data, &["message", "send", &net, "the only message"]);
    wait_for(Duration::from_secs(10), || {
        (events(&a_dirs.data, &net) == 1).then_some(())
    })
    .unwrap();
    let status = a.status();
    let addr = status["listen_addr"].as_str().unwrap().to_owned();
    let a_key = event_crypto::peer_key(status["peer_id"].as_str().unwrap()).unwrap();

    // Garbage, an unknown frame kind, a truncated frame, an oversized length.
    send_raw(&addr, b"\x07garbage that is no frame");
    send_raw(&addr, &[transit::REQUEST, 1, 2, 3]);
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&100u32.to_be_bytes()).unwrap();
        s.write_all(&[transit::REQUEST]).unwrap();
        s.write_all(&[1u8; 49]).unwrap();
    }
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
        s.write_all(&[transit::RESPONSE]).unwrap();
    }
    // A host of the wire version before signed events (its request tag).
    send_raw(&addr, &[0x11, 1, 2, 3]);
    // Sealed to someone else.
    let stranger = event_crypto::peer_key(&"11".repeat(32)).unwrap();
    send_raw(
        &addr,
        &transit::wrap_request(&event_crypto::seal(&stranger, b"not for A")),
    );
    // A response to a request A never made.
    send_raw(&addr, &transit::wrap_response([3; 16], &[4; 32], b"sealed"));
    // A well-sealed request from a stranger that is not a member, twice
    // (the second a replay).
    let eve_dir = tempfile::tempdir().unwrap();
    let eve = HostIdentity::load_or_create(eve_dir.path()).unwrap();
    let request = round_0_request(9);
    let frame = transit::wrap_request(&event_crypto::seal_from(
        &eve,
        &a_key,
        &quiet_host::encoding::codec::encode(&request),
        None,
    ));
    send_raw(&addr, &frame);
    send_raw(&addr, &frame);
    // A payload about no network at all, of a type a plugin would take.
    let no_network = Value::map([
        ("type", Value::from("message")),
        ("text", Value::from("hi")),
    ]);
    send_raw(
        &addr,
        &transit::wrap_request(&event_crypto::seal_from(
            &eve,
            &a_key,
            &quiet_host::encoding::codec::encode(&no_network),
            None,
        )),
    );
    // Mallory holds the network key (a member gone bad): a request of hers
    // with no port to answer to is refused by the sync plugin, and an
    // honest-looking one answered once, its replay refused. (She cannot
    // claim another's peer id: the host names the sender its seal proves.)
    let key_file = a_dirs.data.join("keys").join(format!("{net}.key"));
    let key = event_crypto::NetworkKey(std::fs::read(key_file).unwrap().try_into().unwrap());
    let mallory_dir = tempfile::tempdir().unwrap();
    let mallory = HostIdentity::load_or_create(mallory_dir.path()).unwrap();
    let with = |v: &Value, field: &str, to: Value| {
        let mut v = v.clone();
        if let Value::Map(fields) = &mut v {
            fields
                .iter_mut()
                .filter(|f| f.key.as_str() == field)
                .for_each(|f| f.value = to.clone());
        }
        v
    };
    let no_port = with(&request, "reply_port", Value::from(0));
    let sealed_by_mallory = |v: &Value| {
        transit::wrap_request(&event_crypto::seal_from(
            &mallory,
            &a_key,
            &quiet_host::encoding::codec::encode(v),
            Some((net.as_str(), &key)),
        ))
    };
    send_raw(&addr, &sealed_by_mallory(&no_port));
    let honest = sealed_by_mallory(&request);
    send_raw(&addr, &honest);
    send_raw(&addr, &honest);

    let expected = [
        "drop_malformed_frame",
        "drop_not_a_member",
        "drop_truncated_frame",
        "drop_oversized_frame",
        "drop_wire_version",
        "drop_bad_seal",
        "drop_unknown_or_expired_request",
        "sync_rejected_request",
        // The same sealed box twice: the host drops the replay before any
        // plugin sees it (the sync plugin's own check, by timestamp, is
        // for replays older than the host remembers).
        "drop_replayed_frame",
    ];
    // Eve's request, its replay and her network-less message carry no
    // membership proof: three of those. (Frames arrive on connections of
    // their own, so their counts may land in different flushes.)
    let counted = wait_for(Duration::from_secs(10), || {
        let s = a.status();
        let all = expected.iter().all(|c| counter(&s, c) > 0);
        (all && counter(&s, "drop_not_a_member") >= 3).then_some(s)
    });
    let s = counted.unwrap_or_else(|| panic!("not all drops counted: {}", a.status()["counters"]));
    eprintln!("drop counters: {}", s["counters"]);
    // The operator of a host of the old version is told why, in one line.
    a.wait_log(
        "an older quiet-host sends frames of wire protocol version 1, and this one speaks version 2",
        Duration::from_secs(5),
    );
    // Nothing was stored, nothing was dead-lettered, and A still serves.
    assert_eq!(events(&a_dirs.data, &net), 1);
    assert_eq!(
        query_i64(&a_dirs.data, "SELECT COUNT(*) FROM dead_letters").unwrap(),
        0
    );
    assert_eq!(
        query_i64(
            &a_dirs.data,
            &format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{}'",
                eve.peer_id()
            )
        )
        .unwrap(),
        0,
        "a non-member's address was recorded"
    );
    let (b_dirs, b) = sync_host();
    cli(&b_dirs.data, &["network", "join", &_invite]);
    wait_for(Duration::from_secs(30), || {
        (events(&b_dirs.data, &net) == 1).then_some(())
    })
    .expect("A stopped serving honest peers");
    a.stop();
    b.stop();
}

/// Interop with libsodium through PyNaCl, when it is installed (CI installs
/// it): our sealed box opens with `crypto_box_seal_open`, and theirs with
/// ours.
/// What the Python program `code` prints; panics with `what` and its
/// error if it fails.
fn python(code: &str, what: &str) -> String {
    let out = Command::new("python3").args(["-c", code]).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sealed_boxes_interoperate_with_libsodium() {
    use quiet_host::crypto::{event_crypto, identity::HostIdentity};
    let has_nacl = Command::new("python3")
        .args(["-c", "import nacl"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_nacl {
        eprintln!("skipped: PyNaCl is not installed (pip install pynacl)");
        return;
    }
    // libsodium's key pair, made by PyNaCl.
    let gen = Command::new("python3")
        .args(["-c", "from nacl.public import PrivateKey; k = PrivateKey.generate(); print(k.encode().hex()); print(k.public_key.encode().hex())"])
        .output()
        .unwrap();
    let out = String::from_utf8(gen.stdout).unwrap();
    let mut lines = out.lines();
    let (their_sk, their_pk) = (
        lines.next().unwrap().to_owned(),
        lines.next().unwrap().to_owned(),
    );

    let dir = tempfile::tempdir().unwrap();
    let me = HostIdentity::load_or_create(dir.path()).unwrap();
    let sealed = event_crypto::seal(
        &event_crypto::peer_key(&their_pk).unwrap(),
        b"from quiet-host",
    );
    let check = format!(
        "from nacl.public import PrivateKey, PublicKey, SealedBox\n\
         sk = PrivateKey(bytes.fromhex('{their_sk}'))\n\
         print(SealedBox(sk).decrypt(bytes.fromhex('{}')).decode())\n\
         print(SealedBox(PublicKey(bytes.fromhex('{}'))).encrypt(b'from libsodium').hex())",
        hex::encode(&sealed),
        me.peer_id()
    );
    let out = python(&check, "libsodium refused our sealed box");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("from quiet-host"),
        "libsodium opened our sealed box"
    );
    let theirs = hex::decode(lines.next().unwrap()).unwrap();
    assert_eq!(
        event_crypto::open(me.secret_key(), &theirs).unwrap(),
        b"from libsodium"
    );

    // Our signing key, derived from the X25519 key: libsodium verifies our
    // signature, and maps the verifying key back to our peer id.
    let message = b"signed by quiet-host";
    let signature = me.signing().sign(message);
    let check = format!(
        "from nacl.signing import VerifyKey\n\
         from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519\n\
         vk = bytes.fromhex('{}')\n\
         print(VerifyKey(vk).verify(b'signed by quiet-host', bytes.fromhex('{}')).decode())\n\
         print(crypto_sign_ed25519_pk_to_curve25519(vk).hex())",
        hex::encode(me.signing().verifying_key().as_bytes()),
        hex::encode(signature.to_bytes()),
    );
    let out = python(&check, "libsodium refused our signature");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(&String::from_utf8_lossy(message)[..]));
    assert_eq!(lines.next(), Some(me.peer_id().as_str()));
}
