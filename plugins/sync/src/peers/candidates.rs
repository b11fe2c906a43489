//! Candidates: peers a response names, kept apart from `addresses` in
//! `sync_candidates` until they prove themselves. A response is only its
//! sender's word, and a member could name as many made-up peers (or real
//! peers at addresses of its choosing) as it liked, which every host
//! would then dial for ever. So a named peer is only a candidate: the job
//! tries a few at a time (a round 0), and a candidate becomes an address
//! when its peer answers from it (see `promote`), which only the holder
//! of that peer's key can do.
//!
//! What one member can make us hold is bounded: at most
//! [`MAX_NEW_PER_RESPONSE`] new candidates per response, at most
//! [`MAX_PER_SOURCE`] from any one peer, [`MAX_PER_PEER`] addresses per
//! named peer, and [`MAX_PER_NETWORK`] in all, the oldest dropped first;
//! and what it can make us dial: [`MAX_TRYING`] sessions per network at
//! once, each failing one backed off and given up after `MAX_FAILURES`.

use std::collections::HashMap;

use quiet_plugin_api::{params, Context, PluginError, Value};

use super::{
    backoff::{MAX_FAILURES, MAX_RETRY_INTERVAL_MS},
    is_ip, is_peer_id, is_port, MAX_PEERS,
};

/// New candidates one response may add; the rest of its list is ignored.
pub(crate) const MAX_NEW_PER_RESPONSE: usize = 16;
/// Candidates kept from any one peer's responses, per network: one member
/// cannot crowd out what the others named.
pub(crate) const MAX_PER_SOURCE: i64 = 16;
/// Addresses kept for one named peer, per network: a member naming a real
/// peer at a wrong address cannot keep its real one out.
pub(crate) const MAX_PER_PEER: i64 = 4;
/// Candidates kept per network.
pub(crate) const MAX_PER_NETWORK: i64 = 64;
/// Sessions with candidates in flight per network at once.
pub(crate) const MAX_TRYING: usize = 4;

/// Keeps the peers that `source`'s response lists as candidates: only
/// well-formed ones other than us, and not those with an active address
/// (theirs came from themselves). Known candidates are left as they are.
pub(crate) fn learn(
    ctx: &mut Context<'_>,
    network_id: &str,
    peers: &[Value],
    ours: &str,
    source: &str,
    now: i64,
) -> Result<(), PluginError> {
    let mut added = 0;
    for p in peers.iter().take(MAX_PEERS) {
        if added == MAX_NEW_PER_RESPONSE {
            break;
        }
        let peer_id = p.get("peer_id").and_then(Value::as_str).unwrap_or("");
        let ip = p.get("ip").and_then(Value::as_str).unwrap_or("");
        let port = p.get("port").and_then(Value::as_int).unwrap_or(0);
        if !is_peer_id(peer_id) || peer_id == ours || !is_ip(ip) || !is_port(port) {
            continue;
        }
        let new = ctx.execute(
            "INSERT OR IGNORE INTO sync_candidates \
             (peer_id, network_id, ip, port, learned_from, learned_ms) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (SELECT 1 FROM addresses \
             WHERE peer_id = ?1 AND network_id = ?2 AND is_active = 1)",
            params![peer_id, network_id, ip, port, source, now],
        )?;
        if new == 0 {
            continue;
        }
        added += 1;
        drop_oldest(ctx, network_id, Some(("peer_id", peer_id)), MAX_PER_PEER)?;
    }
    if added > 0 {
        drop_oldest(
            ctx,
            network_id,
            Some(("learned_from", source)),
            MAX_PER_SOURCE,
        )?;
        drop_oldest(ctx, network_id, None, MAX_PER_NETWORK)?;
    }
    Ok(())
}

/// Drops the oldest candidates of `network_id` (those whose `column` is
/// `value`, given `Some((column, value))`) beyond the newest `keep`.
fn drop_oldest(
    ctx: &mut Context<'_>,
    network_id: &str,
    only: Option<(&str, &str)>,
    keep: i64,
) -> Result<(), PluginError> {
    // `'' = ''` when all of the network's count.
    let (column, value) = only.unwrap_or(("''", ""));
    ctx.execute(
        &format!(
            "DELETE FROM sync_candidates WHERE rowid IN (SELECT rowid FROM sync_candidates \
             WHERE network_id = ?1 AND {column} = ?2 \
             ORDER BY learned_ms DESC, rowid DESC LIMIT -1 OFFSET ?3)"
        ),
        params![network_id, value, keep],
    )?;
    Ok(())
}

/// A candidate to try: peer, network, ip, port.
pub(crate) type Candidate = (String, String, String, i64);

/// The candidates the job may try now, at most [`MAX_TRYING`] per network
/// less the `trying` already in flight, one address per peer, oldest
/// first: those of peers with no active address, not given up, and whose
/// back-off is over.
pub(crate) fn to_try(
    ctx: &mut Context<'_>,
    ours: &str,
    only_network: &str,
    trying: &HashMap<String, usize>,
    busy: impl Fn(&str, &str) -> bool,
    now: i64,
) -> Result<Vec<Candidate>, PluginError> {
    let rows = ctx.query(
        "SELECT c.peer_id, c.network_id, c.ip, c.port FROM sync_candidates c \
         JOIN networks n ON n.network_id = c.network_id \
         LEFT JOIN sync_backoff b ON b.peer_id = c.peer_id AND b.network_id = c.network_id \
         AND b.ip = c.ip AND b.port = c.port \
         WHERE c.peer_id != ?1 AND (?2 = '' OR c.network_id = ?2) \
         AND NOT EXISTS (SELECT 1 FROM addresses a WHERE a.peer_id = c.peer_id \
         AND a.network_id = c.network_id AND a.is_active = 1) \
         AND (b.failures IS NULL OR (b.failures < ?3 \
         AND (b.next_try_ms <= ?4 OR b.next_try_ms > ?4 + ?5))) \
         ORDER BY c.network_id, c.learned_ms, c.rowid",
        params![ours, only_network, MAX_FAILURES, now, MAX_RETRY_INTERVAL_MS],
    )?;
    let mut picked: HashMap<String, usize> = trying.clone();
    let mut out: Vec<Candidate> = Vec::new();
    for r in rows.iter() {
        let (Some(peer_id), Some(network_id), Some(ip), Some(port)) =
            (r.str(0), r.str(1), r.str(2), r.int(3))
        else {
            continue;
        };
        let n = picked.entry(network_id.to_owned()).or_default();
        let taken = out.iter().any(|c| c.0 == peer_id && c.1 == network_id);
        if *n >= MAX_TRYING || taken || busy(peer_id, network_id) {
            continue;
        }
        *n += 1;
        out.push((peer_id.into(), network_id.into(), ip.into(), port));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;

    use super::{MAX_NEW_PER_RESPONSE, MAX_PER_NETWORK, MAX_PER_PEER, MAX_TRYING};
    use crate::test_host::*;

    /// `n` made-up peers from `first` on, at addresses of a member's choosing.
    fn made_up(first: u32, n: u32) -> Vec<Value> {
        (first..first + n)
            .map(|i| named(&made_up_peer(i), "192.0.2.1", 1 + i64::from(i)))
            .collect()
    }

    fn candidates(host: &TestHost, filter: &str) -> i64 {
        host.count(&format!(
            "SELECT COUNT(*) FROM sync_candidates WHERE {filter}"
        ))
    }

    #[test]
    fn a_response_cannot_add_addresses_only_candidates_capped_per_response() {
        let (a, _b) = two_peers();
        let before = listed(&a.host, "addresses");
        let sessions_with_b = |a: &Peer| {
            let sent = a.run_job(&limits(1000));
            to(&sent, PEER_B)[0].clone()
        };
        let request = sessions_with_b(&a);
        a.process(&answer(&request, made_up(0, 300)));
        assert_eq!(listed(&a.host, "addresses"), before);
        let from_b = format!("learned_from = '{PEER_B}'");
        assert_eq!(candidates(&a.host, &from_b), MAX_NEW_PER_RESPONSE as i64);
        assert_eq!(candidates(&a.host, "1"), MAX_NEW_PER_RESPONSE as i64);
        // The next response's peers replace B's oldest: one member's word
        // takes no more room however often it speaks.
        a.handler.state().sessions.clear();
        a.process(&answer(&sessions_with_b(&a), made_up(1_000, 300)));
        assert_eq!(candidates(&a.host, &from_b), 16);
        assert_eq!(candidates(&a.host, "CAST(port AS INTEGER) > 1000"), 16);
        assert_eq!(listed(&a.host, "addresses"), before);
    }

    #[test]
    fn candidates_are_capped_per_network_and_per_named_peer() {
        let a = Peer::new(PEER_A, 7001);
        let sources: Vec<String> = (0..6).map(|i| made_up_peer(50_000 + i)).collect();
        for (i, s) in sources.iter().enumerate() {
            add_address(&a.host, s, 8000 + i as i64, true);
        }
        let sent = a.run_job(&limits(1000));
        assert_eq!(sent.len(), sources.len());
        // One names a real peer at ten addresses; the others 16 peers each.
        let at_ten: Vec<Value> = (0..10)
            .map(|i| named(PEER_C, "192.0.2.9", 9000 + i))
            .collect();
        a.process(&answer(&sent[0], at_ten));
        assert_eq!(
            candidates(&a.host, &format!("peer_id = '{PEER_C}'")),
            MAX_PER_PEER
        );
        for (i, request) in sent.iter().enumerate().skip(1) {
            a.process(&answer(request, made_up(100 * i as u32, 16)));
        }
        // 4 + 5 × 16 = 84 named: the oldest went first.
        assert_eq!(candidates(&a.host, "1"), MAX_PER_NETWORK);
        assert_eq!(candidates(&a.host, &format!("peer_id = '{PEER_C}'")), 0);
        assert_eq!(candidates(&a.host, "CAST(port AS INTEGER) < 117"), 0);
    }

    #[test]
    fn only_a_few_candidates_are_tried_at_once() {
        let (a, _b) = two_peers();
        let request = to(&a.run_job(&limits(1000)), PEER_B)[0].clone();
        a.process(&answer(&request, made_up(0, 16)));
        let sent = a.run_job(&limits(1000));
        let tried = sent.iter().filter(|r| r.str("seal_to") != Some(PEER_B));
        assert_eq!(tried.count(), MAX_TRYING);
        // While those are in flight, no more.
        let sent = a.run_job(&limits(1000));
        assert!(
            sent.iter().all(|r| r.str("seal_to") == Some(PEER_B)),
            "{sent:?}"
        );
    }

    #[test]
    fn an_address_is_kept_only_after_a_round_trip_from_it() {
        // C answers, at the address B named: so A learns C through B.
        let (a, b) = two_peers();
        let c = Peer::new(PEER_C, 7003);
        session(&a, &b, 1000);
        let no_c = |a: &Peer| {
            a.host.count(&format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_C}'"
            )) == 0
        };
        assert!(no_c(&a), "a named peer is only a candidate");
        let sent = a.run_job(&limits(1000));
        let to_c = to(&sent, PEER_C)[0].clone();
        assert_eq!(to_c.int("dest_port"), Some(7003));
        // An answer from anyone else is no proof that C is there (the host
        // names the sender its seal proves).
        let from_c = c.process(&arrived(&to_c, PEER_A)).remove(0);
        a.process(&arrived(&from_c, PEER_X));
        assert!(no_c(&a));
        assert_eq!(counter(&a.host, "sync_rejected_response"), 1);
        // C's own answer is.
        let sent = a.run_job(&limits(1000));
        let to_c = to(&sent, PEER_C)[0].clone();
        c.host
            .db()
            .execute("DELETE FROM sync_sessions", [])
            .unwrap();
        let from_c = c.process(&arrived(&to_c, PEER_A)).remove(0);
        a.process(&arrived(&from_c, PEER_C));
        assert_eq!(
            a.host.count(&format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_C}' AND ip = '127.0.0.1' \
                 AND port = 7003 AND is_active = 1 AND last_seen_ms > 0"
            )),
            1
        );
        assert_eq!(listed(&a.host, "sync_candidates"), "");
    }
}
