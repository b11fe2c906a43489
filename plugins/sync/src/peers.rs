//! Peers: where this host listens, and which addresses of others it keeps
//! and gives out. An address is kept in `addresses` only on its peer's
//! own authenticated word: a response from it to a request we sent there
//! (a round trip, which only the holder of the peer's key can complete:
//! see [`promote`]), or the reply address of a request it sent us (see
//! [`remember_requester`]). Peers that responses name are only
//! candidates (`candidates`) until they answer; addresses that stop
//! answering are backed off, marked inactive and in the end forgotten
//! (`backoff`). Each address is checked to be one the host can seal to
//! and dial before it is kept: a malformed one would fail every request.

mod backoff;
pub(crate) mod candidates;

use std::net::IpAddr;

use quiet_plugin_api::{params, Context, PluginError, Value};

pub(crate) use backoff::{failed, prune, Addr, MAX_FAILURES, MAX_RETRY_INTERVAL_MS};
pub(crate) use candidates::{learn as learn_candidates, to_try as candidates_to_try};

use crate::wire::Request;

/// Peers listed in one response, and read from one.
const MAX_PEERS: usize = 256;
/// Addresses kept per network. One per peer: `addresses` is keyed by peer
/// and network.
pub(crate) const MAX_ADDRESSES: i64 = 256;

/// Keeps the reply address of a request we answer, as the requester's own
/// word for where it is, and clears its back-off: it is alive (and an
/// inactive address is active again). An address that has completed a
/// session from us (`last_sync_ms`) and is not failing is kept rather
/// than replaced by a word that nothing has tested: the reply address is
/// still answered, and if a session we open to it completes (the peer
/// asks us to, see `responder`), [`promote`] takes it.
pub(crate) fn remember_requester(
    ctx: &mut Context<'_>,
    req: &Request<'_>,
    now: i64,
) -> Result<(), PluginError> {
    let known = ctx.query(
        "SELECT a.ip, a.port, a.last_sync_ms IS NOT NULL AND b.failures IS NULL FROM addresses a \
         LEFT JOIN sync_backoff b ON b.peer_id = a.peer_id AND b.network_id = a.network_id \
         AND b.ip = a.ip AND b.port = a.port WHERE a.peer_id = ?1 AND a.network_id = ?2",
        params![req.peer_id, req.network_id],
    )?;
    let known = known.first();
    let same =
        known.is_some_and(|r| r.str(0) == Some(req.reply_ip) && r.int(1) == Some(req.reply_port));
    let proven = known.is_some_and(|r| r.int(2) == Some(1));
    backoff::cleared(ctx, req.peer_id, req.network_id, None)?;
    if proven && !same {
        ctx.execute(
            "UPDATE addresses SET is_active = 1, last_seen_ms = ?3 WHERE peer_id = ?1 AND network_id = ?2",
            params![req.peer_id, req.network_id, now],
        )?;
        return Ok(());
    }
    let addr = Addr {
        peer_id: req.peer_id,
        network_id: req.network_id,
        ip: req.reply_ip,
        port: req.reply_port,
    };
    keep(ctx, addr, now, known.is_none())
}

/// Keeps `addr`, whose peer has just answered a session from us there: a
/// round trip, so the address is its own (a request was sealed to its key,
/// and only the holder of that key could answer under the request's
/// transit secret). Replaces the peer's address, and its candidates are
/// no longer needed.
pub(crate) fn promote(ctx: &mut Context<'_>, addr: Addr<'_>, now: i64) -> Result<(), PluginError> {
    ctx.execute(
        "DELETE FROM sync_candidates WHERE peer_id = ?1 AND network_id = ?2",
        params![addr.peer_id, addr.network_id],
    )?;
    backoff::cleared(
        ctx,
        addr.peer_id,
        addr.network_id,
        Some((addr.ip, addr.port)),
    )?;
    let known = ctx.query(
        "SELECT 1 FROM addresses WHERE peer_id = ?1 AND network_id = ?2",
        params![addr.peer_id, addr.network_id],
    )?;
    keep(ctx, addr, now, known.is_empty())
}

/// Records `addr` as its peer's active address, seen `now`. A session
/// completed at another address says nothing of this one, so a change of
/// address clears `last_sync_ms`. A `new` peer may take the network over
/// [`MAX_ADDRESSES`]: then the inactive go first, then the least lately
/// seen.
fn keep(ctx: &mut Context<'_>, addr: Addr<'_>, now: i64, new: bool) -> Result<(), PluginError> {
    ctx.execute(
        "INSERT INTO addresses (peer_id, network_id, ip, port, is_active, last_seen_ms) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5) \
         ON CONFLICT (peer_id, network_id) DO UPDATE SET \
         last_sync_ms = CASE WHEN ip = excluded.ip AND port = excluded.port THEN last_sync_ms END, \
         ip = excluded.ip, port = excluded.port, is_active = 1, last_seen_ms = excluded.last_seen_ms",
        params![addr.peer_id, addr.network_id, addr.ip, addr.port, now],
    )?;
    if new {
        ctx.execute(
            "DELETE FROM addresses WHERE rowid IN (SELECT rowid FROM addresses \
             WHERE network_id = ?1 ORDER BY is_active DESC, COALESCE(last_seen_ms, 0) DESC \
             LIMIT -1 OFFSET ?2)",
            params![addr.network_id, MAX_ADDRESSES],
        )?;
    }
    Ok(())
}

/// The peers a response to `req` lists: the network's other active
/// addresses, the latest seen first, as [`learn_candidates`] reads them.
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
        let peer = named;
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
        // Learned as candidates: only B, which answered, is an address.
        assert_eq!(
            listed(&a.host, "addresses"),
            format!("{PEER_B} 127.0.0.1 7002")
        );
        assert_eq!(
            listed(&a.host, "sync_candidates"),
            format!("{PEER_C} 10.0.0.3 7003, {PEER_X} ::1 7004")
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

    #[test]
    fn a_requesters_word_does_not_replace_an_address_that_works() {
        let (a, b) = two_peers();
        session(&a, &b, 1000);
        assert!(synced_with_b(&a));
        let b_asks = |a: &Peer| {
            a.host
                .db()
                .execute("DELETE FROM sync_sessions", [])
                .unwrap();
            a.process(&request_from(PEER_B, new_id(), 0, vec![]));
            listed(&a.host, "addresses")
        };
        // B's request says it is at 10.0.0.9:7009, but a session with it at
        // 127.0.0.1:7002 has completed and nothing has failed there since.
        assert_eq!(b_asks(&a), format!("{PEER_B} 127.0.0.1 7002"));
        // Once that address fails, the peer's own word is better.
        a.with_ctx(|ctx| {
            let addr = super::Addr {
                peer_id: PEER_B,
                network_id: NET,
                ip: "127.0.0.1",
                port: 7002,
            };
            super::failed(ctx, addr, now_ms()).unwrap()
        });
        assert_eq!(b_asks(&a), format!("{PEER_B} 10.0.0.9 7009"));
        let unsynced = format!(
            "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_B}' AND last_sync_ms IS NULL"
        );
        assert_eq!(a.host.count(&unsynced), 1, "no session completed there yet");
    }
}
