//! Peers: where this host listens, and which addresses of others it keeps
//! and gives out. Addresses come from peers (a requester's reply address,
//! the lists in responses) and are never forgotten, so each is checked to
//! be one the host can seal to and dial before it is kept: a malformed one
//! would fail every request to that peer.

use std::net::IpAddr;

use quiet_plugin_api::{params, Context, PluginError, Value};

use crate::wire::Request;

/// Peers listed in, and learned from, one response.
const MAX_PEERS: usize = 256;

/// Keeps the reply address of a request we answer, as the requester's own
/// word for where it is.
pub(crate) fn remember_requester(
    ctx: &mut Context<'_>,
    req: &Request<'_>,
    now: i64,
) -> Result<(), PluginError> {
    ctx.execute(
        "INSERT INTO addresses (peer_id, network_id, ip, port, is_active, last_seen_ms) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5) \
         ON CONFLICT (peer_id, network_id) DO UPDATE SET \
         ip = excluded.ip, port = excluded.port, is_active = 1, last_seen_ms = excluded.last_seen_ms",
        params![req.peer_id, req.network_id, req.reply_ip, req.reply_port, now],
    )?;
    Ok(())
}

/// The peers a response to `req` lists: the network's other active
/// addresses, the latest seen first, as [`learn_peers`] reads them.
pub(crate) fn listed_for(
    ctx: &mut Context<'_>,
    req: &Request<'_>,
) -> Result<Vec<Value>, PluginError> {
    let peers = ctx.query(
        "SELECT peer_id, ip, port FROM addresses \
         WHERE network_id = ?1 AND is_active = 1 AND peer_id != ?2 \
         ORDER BY last_seen_ms DESC LIMIT ?3",
        params![req.network_id, req.peer_id, MAX_PEERS],
    )?;
    Ok(peers
        .iter()
        .map(|p| Value::map([("peer_id", p.get(0)), ("ip", p.get(1)), ("port", p.get(2))]))
        .collect())
}

/// Adds the peers a response names to `addresses`, without touching known
/// ones (their addresses come from themselves) or adding this host. Entries
/// that are not a well-formed peer id, IP and port are skipped.
pub(crate) fn learn_peers(
    ctx: &mut Context<'_>,
    network_id: &str,
    peers: &[Value],
    ours: &str,
) -> Result<(), PluginError> {
    for p in peers.iter().take(MAX_PEERS) {
        let peer_id = p.get("peer_id").and_then(Value::as_str).unwrap_or("");
        let ip = p.get("ip").and_then(Value::as_str).unwrap_or("");
        let port = p.get("port").and_then(Value::as_int).unwrap_or(0);
        if !is_peer_id(peer_id) || peer_id == ours || !is_ip(ip) || !is_port(port) {
            continue;
        }
        ctx.execute(
            "INSERT OR IGNORE INTO addresses (peer_id, network_id, ip, port, is_active) \
             VALUES (?1, ?2, ?3, ?4, 1)",
            params![peer_id, network_id, ip, port],
        )?;
    }
    Ok(())
}

/// This host's reply address, from `host_state.listen_addr` ("ip:port").
pub(crate) fn listen_addr(ctx: &mut Context<'_>) -> Result<Option<(String, i64)>, PluginError> {
    let rows = ctx.query(
        "SELECT value FROM host_state WHERE key = 'listen_addr'",
        params![],
    )?;
    Ok(rows
        .first()
        .and_then(|r| r.str(0))
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(ip, port)| Some((ip.to_owned(), port.parse().ok()?))))
}

/// 64 lowercase hex digits, as the host writes a peer id (its public key):
/// anything else is no peer we could seal to.
pub(crate) fn is_peer_id(s: &str) -> bool {
    is_hex(s, 64)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An IP address, as the host requires of `dest_ip`: anything else would
/// fail every request to that peer.
pub(crate) fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

pub(crate) fn is_port(port: i64) -> bool {
    (1..=65535).contains(&port)
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;

    use crate::test_host::*;

    #[test]
    fn requests_with_a_malformed_peer_id_or_reply_address_are_rejected() {
        let mut host = host("127.0.0.1:7002");
        let with =
            |key, value: &str| with_field(request_from(PEER_A, new_id(), 0, vec![]), key, value);
        let from = |peer_id: &str| request_from(peer_id, new_id(), 0, vec![]);
        let port = |port: i64| {
            with_field(
                request_from(PEER_A, new_id(), 0, vec![]),
                "reply_port",
                port,
            )
        };
        host.deliver(vec![
            from(&PEER_A.to_uppercase()),
            from(&PEER_A[..63]),
            from(&format!("{}g", &PEER_A[..63])),
            with("reply_ip", "peer.example"),
            with("reply_ip", "10.0.0.256"),
            with("reply_ip", "10.0.0.9:7009"),
            port(0),
            port(65_536),
        ])
        .unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_rejected_request"), 8);
        assert_eq!(host.count("SELECT COUNT(*) FROM addresses"), 0);
        // An IPv6 address is as good.
        host.deliver(vec![with("reply_ip", "::1")]).unwrap();
        assert_eq!(host.take_sent()[0].str("dest_ip"), Some("::1"));
    }

    #[test]
    fn only_well_formed_peers_other_than_us_are_learned() {
        let (a, b) = two_peers();
        let request = a.run_job(&limits(1000)).pop().unwrap();
        let response = b.process(&arrived(&request, PEER_A)).remove(0);
        let peer = |id: &str, ip: &str, port: i64| {
            Value::map([
                ("peer_id", Value::from(id)),
                ("ip", ip.into()),
                ("port", port.into()),
            ])
        };
        let peers = vec![
            peer(PEER_C, "10.0.0.3", 7003),
            peer(PEER_X, "::1", 7004),
            peer(&PEER_Z.to_uppercase(), "10.0.0.5", 7005),
            peer(&PEER_Z[..62], "10.0.0.5", 7005),
            peer(PEER_Z, "peer.example", 7005),
            peer(PEER_Z, "", 7005),
            peer(PEER_Z, "10.0.0.5", 0),
            peer(PEER_Z, "10.0.0.5", 65_536),
            peer(PEER_A, "10.0.0.1", 7001), // us
        ];
        a.process(&arrived(&with_field(response, "peers", peers), PEER_B));
        let learned: String = a
            .host
            .db()
            .query_row(
                "SELECT group_concat(peer_id || ' ' || ip || ' ' || port, ', ') \
                 FROM (SELECT * FROM addresses ORDER BY peer_id)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            learned,
            format!("{PEER_B} 127.0.0.1 7002, {PEER_C} 10.0.0.3 7003, {PEER_X} ::1 7004")
        );
        // Nor does a request from us, to us, add us.
        assert!(a.process(&arrived(&request, PEER_A)).is_empty());
        assert_eq!(counter(&a.host, "sync_rejected_request"), 1);
        assert_eq!(
            a.host.count(&format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_A}'"
            )),
            0
        );
    }
}
