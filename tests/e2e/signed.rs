//! Signed events between real hosts: who wrote an event is the key that
//! signed it, on every host it reaches, and nothing a member rewrites or
//! copies keeps a signature (docs/design/signed-events.md).

use std::{path::Path, time::Duration};

use quiet_host::crypto::{event_crypto::NetworkKey, identity::HostIdentity, signed_event};
use quiet_test_support::wait_for;

use crate::{
    db, query_i64,
    sync::{cli, create_network, events, sync_host},
};

/// `(author, text)` of each message `message list --json` shows.
fn authors_and_texts(data: &Path, network: &str) -> Vec<(String, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&cli(data, &["message", "list", network, "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["verified"], true, "{m}");
            let field = |k: &str| m[k].as_str().unwrap().to_owned();
            (field("author"), field("text"))
        })
        .collect()
}

pub(crate) fn peer_id(data: &Path) -> String {
    HostIdentity::load(data).unwrap().peer_id()
}

fn network_key(data: &Path, network: &str) -> NetworkKey {
    let bytes = std::fs::read(data.join("keys").join(format!("{network}.key"))).unwrap();
    NetworkKey(bytes.try_into().unwrap())
}

#[test]
fn a_message_signed_by_a_reaches_c_through_b_and_all_three_list_a_as_author() {
    let (a_dirs, a) = sync_host();
    let (b_dirs, b) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite]);
    cli(&a_dirs.data, &["message", "send", &net, "signed by a"]);
    wait_for(Duration::from_secs(30), || {
        (events(&b_dirs.data, &net) == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("B never got A's message; log of B:\n{}", b.log().join("\n")));
    // A leaves before C exists: C can only get A's event from B.
    a.stop();
    let (c_dirs, c) = sync_host();
    let invite_b = cli(&b_dirs.data, &["network", "invite", &net]);
    cli(&c_dirs.data, &["network", "join", &invite_b]);
    wait_for(Duration::from_secs(30), || {
        (events(&c_dirs.data, &net) == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("C never got A's message; log of C:\n{}", c.log().join("\n")));

    let a_id = peer_id(&a_dirs.data);
    let expected = vec![(a_id, "signed by a".to_owned())];
    for (who, dirs) in [("A", &a_dirs), ("B", &b_dirs), ("C", &c_dirs)] {
        assert_eq!(authors_and_texts(&dirs.data, &net), expected, "on {who}");
    }
    // Relayed, the event is the same bytes-for-signature: one id everywhere.
    assert_eq!(
        crate::sync::message_ids(&c_dirs.data, &net),
        crate::sync::message_ids(&a_dirs.data, &net)
    );
    b.stop();
    c.stop();
}

/// A message row in `data`'s own `events` table; see [`plant_typed`].
fn plant(data: &Path, network: &str, event_id: &[u8], event: &[u8]) {
    plant_typed(data, network, "message", event_id, event)
}

/// A row of `event_type` in `data`'s own `events` table, written past its
/// event store, as a member gone bad can: its sync plugin then offers it
/// to every peer.
pub(crate) fn plant_typed(
    data: &Path,
    network: &str,
    event_type: &str,
    event_id: &[u8],
    event: &[u8],
) {
    quiet_host::storage::db::open(data)
        .unwrap()
        .execute(
            "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            rusqlite::params![
                event_id,
                network,
                i64::from_be_bytes(event[..8].try_into().unwrap()),
                event_type,
                event
            ],
        )
        .unwrap();
}

/// The stored bytes of the one message of `network` in `data`.
fn stored_event(data: &Path, network: &str) -> (Vec<u8>, Vec<u8>) {
    db(data)
        .query_row(
            "SELECT event_id, event FROM events WHERE network_id = ?1 AND event_type = 'message'",
            [network],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[test]
fn forged_authors_changed_bytes_and_other_networks_are_refused_on_every_host() {
    let (a_dirs, a) = sync_host();
    let (b_dirs, b) = sync_host();
    let (m_dirs, m) = sync_host();
    let (invite_1, net_1) = create_network(&a_dirs.data);
    let (invite_2, net_2) = create_network(&a_dirs.data);
    for dirs in [&b_dirs, &m_dirs] {
        cli(&dirs.data, &["network", "join", &invite_1]);
        cli(&dirs.data, &["network", "join", &invite_2]);
    }
    cli(&a_dirs.data, &["message", "send", &net_1, "pay bob 10"]);
    cli(&m_dirs.data, &["message", "send", &net_2, "from mallory"]);
    let all_have = |n1: i64, n2: i64| {
        [&a_dirs, &b_dirs, &m_dirs]
            .iter()
            .all(|d| events(&d.data, &net_1) == n1 && events(&d.data, &net_2) == n2)
    };
    wait_for(Duration::from_secs(40), || all_have(1, 1).then_some(()))
        .unwrap_or_else(|| panic!("no first sync; log of M:\n{}", m.log().join("\n")));

    // Mallory, a member of both networks, with the host's own library.
    let (key_1, key_2) = (
        network_key(&m_dirs.data, &net_1),
        network_key(&m_dirs.data, &net_2),
    );
    let (a_event_id, a_event) = stored_event(&m_dirs.data, &net_1);
    let (own_id, own_event) = stored_event(&m_dirs.data, &net_2);
    let clear_ms = |event: &[u8]| i64::from_be_bytes(event[..8].try_into().unwrap());
    let other_id = |id: &[u8], last: u8| [&id[..31], &[id[31] ^ last]].concat();
    // 1. Her own signed message, its author rewritten to A.
    let mut inner = signed_event::open_inner(&key_2, &own_event).unwrap();
    let a_bytes: [u8; 32] = hex::decode(peer_id(&a_dirs.data))
        .unwrap()
        .try_into()
        .unwrap();
    inner[signed_event::AUTHOR_IN_INNER].copy_from_slice(&a_bytes);
    let as_a = signed_event::seal_inner(&key_2, clear_ms(&own_event), &inner);
    plant(&m_dirs.data, &net_2, &other_id(&own_id, 1), &as_a);
    // 2. A's message, one byte of its text changed: "pay bob 90".
    let mut inner = signed_event::open_inner(&key_1, &a_event).unwrap();
    let at = inner.windows(2).rposition(|w| w == b"10").unwrap();
    inner[at] = b'9';
    let altered = signed_event::seal_inner(&key_1, clear_ms(&a_event), &inner);
    plant(&m_dirs.data, &net_1, &other_id(&a_event_id, 1), &altered);
    // 3. A's message, unchanged, re-encrypted into network two.
    let inner = signed_event::open_inner(&key_1, &a_event).unwrap();
    let copied = signed_event::seal_inner(&key_2, clear_ms(&a_event), &inner);
    plant(&m_dirs.data, &net_2, &other_id(&a_event_id, 2), &copied);

    // A and B fetch all three from Mallory, and refuse each.
    for (who, host) in [("A", &a), ("B", &b)] {
        wait_for(Duration::from_secs(40), || {
            let refused = host.status()["counters"]["drop_bad_signature"]
                .as_i64()
                .unwrap_or(0);
            (refused >= 3).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{who} did not refuse the three; status: {:#}",
                host.status()
            )
        });
    }
    for (who, dirs) in [("A", &a_dirs), ("B", &b_dirs)] {
        let data = &dirs.data;
        assert_eq!(
            (events(data, &net_1), events(data, &net_2)),
            (1, 1),
            "{who} stored a forgery"
        );
        assert_eq!(
            authors_and_texts(data, &net_1),
            [(peer_id(&a_dirs.data), "pay bob 10".to_owned())],
            "on {who}"
        );
        assert_eq!(
            authors_and_texts(data, &net_2),
            [(peer_id(&m_dirs.data), "from mallory".to_owned())],
            "on {who}"
        );
        assert_eq!(
            query_i64(data, "SELECT COUNT(*) FROM dead_letters"),
            Some(0),
            "{who}: refused events are counted, not dead letters"
        );
    }
    // The honest hosts still sync with each other.
    cli(&b_dirs.data, &["message", "send", &net_1, "still here"]);
    wait_for(Duration::from_secs(30), || {
        (events(&a_dirs.data, &net_1) == 2).then_some(())
    })
    .expect("A and B stopped syncing");
    for h in [a, b, m] {
        h.stop();
    }
}
