//! A member gone bad answers the sync requests sent to it with responses
//! of its own making. The peers it names must not become addresses that
//! its victim keeps, gives out or dials at will.

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use quiet_host::{
    crypto::{event_crypto, identity::HostIdentity, transit},
    encoding::codec,
};
use quiet_plugin_api::Value;
use quiet_test_support::wait_for;

use crate::{
    query_i64,
    sync::{create_network, round_0_request, send_raw, sync_host},
};

/// Answers each sync request that arrives on `conn`, from V to Mallory,
/// naming 300 made-up peers.
fn answer_naming_300(
    mut conn: TcpStream,
    mallory: &HostIdentity,
    key: &event_crypto::NetworkKey,
    v_addr: &str,
    answered: &AtomicUsize,
) {
    let peers: Vec<Value> = (0..300u32)
        .map(|i| {
            Value::map([
                ("peer_id", Value::from(format!("{i:064x}"))),
                ("ip", Value::from("192.0.2.1")),
                ("port", Value::from(1 + i64::from(i))),
            ])
        })
        .collect();
    let mut len = [0u8; 4];
    while conn.read_exact(&mut len).is_ok() {
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        if conn.read_exact(&mut frame).is_err() {
            return;
        }
        // V's answer to Mallory's own request comes this way too.
        if frame.first() != Some(&transit::REQUEST) {
            continue;
        }
        let Ok(opened) = event_crypto::open_from(mallory, &frame[1..]) else {
            continue;
        };
        let request = codec::decode(&opened.payload).unwrap();
        let field = |k: &str| request.get(k).and_then(Value::as_bytes).unwrap().to_vec();
        let response = Value::map([
            ("type", Value::from("sync_response")),
            ("session_id", Value::from(field("session_id"))),
            ("peers", Value::from(peers.clone())),
        ]);
        let body = event_crypto::with_member_proof(key, &codec::encode(&response));
        let request_id: [u8; 16] = field("request_id").try_into().unwrap();
        let secret: [u8; 32] = field("transit_secret").try_into().unwrap();
        send_raw(v_addr, &transit::wrap_response(request_id, &secret, &body));
        answered.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_member_crafted_sync_response_naming_300_made_up_peers_adds_no_address() {
    let (v_dirs, v) = sync_host();
    let (_invite, net) = create_network(&v_dirs.data);
    let status = v.status();
    let v_addr = status["listen_addr"].as_str().unwrap().to_owned();
    let v_key = event_crypto::peer_key(status["peer_id"].as_str().unwrap()).unwrap();
    // Mallory holds the network key, and listens.
    let key_file = v_dirs.data.join("keys").join(format!("{net}.key"));
    let key = event_crypto::NetworkKey(std::fs::read(key_file).unwrap().try_into().unwrap());
    let mallory_dir = tempfile::tempdir().unwrap();
    let mallory = Arc::new(HostIdentity::load_or_create(mallory_dir.path()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = Arc::new(AtomicUsize::new(0));
    {
        let (mallory, key, v_addr, answered) = (
            mallory.clone(),
            key.clone(),
            v_addr.clone(),
            answered.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                conn.set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                answer_naming_300(conn, &mallory, &key, &v_addr, &answered);
            }
        });
    }
    // She asks V once, so that V keeps her address and syncs with her.
    let hello = round_0_request(port);
    let sealed = event_crypto::seal_from(
        &mallory,
        &v_key,
        &codec::encode(&hello),
        Some((net.as_str(), &key)),
    );
    send_raw(&v_addr, &transit::wrap_request(&sealed));

    let three = wait_for(Duration::from_secs(30), || {
        (answered.load(Ordering::Relaxed) >= 3).then_some(())
    });
    assert!(three.is_some(), "V never asked Mallory");
    let count = |sql: &str| query_i64(&v_dirs.data, sql).unwrap();
    // V was told of 900 peers: it keeps only Mallory's own address, and
    // at most 16 of hers as candidates to try.
    wait_for(Duration::from_secs(10), || {
        (count("SELECT COUNT(*) FROM sync_candidates") > 0).then_some(())
    })
    .expect("no candidates learned");
    assert_eq!(count("SELECT COUNT(*) FROM addresses"), 1);
    assert_eq!(
        count(&format!(
            "SELECT COUNT(*) FROM addresses WHERE peer_id = '{}' AND port = {port}",
            mallory.peer_id()
        )),
        1
    );
    assert!(count("SELECT COUNT(*) FROM sync_candidates") <= 16);
    v.stop();
}
