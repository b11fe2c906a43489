//! The responder's side of a round: one admitted request in, one response
//! out. It keeps no session of its own (negentropy's server side is
//! stateless, and the set of ids is the one both sides share), and what its
//! limits leave out it lists as `deferred`, so that the requester asks
//! again rather than loses it. When a request shows that we lack ids, it
//! also opens our own session with the requester, so that both directions
//! move at once.

use negentropy::{Id, Negentropy};
use quiet_plugin_api::{envelope, Context, Envelope, PluginError, Value};

use crate::{
    admission, dropped,
    event_set::SUMMARY_LEN,
    limits::FRAME_SIZE_LIMIT,
    peers::{self, listen_addr, Addr},
    session::{event_set, Target},
    wire::{message, Request},
    SyncHandler,
};

/// Ids per `IN (...)` query, well below SQLite's parameter limit.
const ID_CHUNK: usize = 500;
/// Event bytes per response; the rest is deferred to the next round. Keeps
/// a response under the host's 8 MiB frame limit whatever the event sizes.
const MAX_RESPONSE_EVENT_BYTES: usize = 6 << 20;

impl SyncHandler {
    /// Responder: answers one verified `sync_request`, or drops it (counted).
    pub(crate) fn answer(
        &self,
        env: &Envelope,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        let ours = ctx.identity().peer_id.to_string();
        let now = ctx.now_ms();
        let limits = self.state().limits;
        let request = Request::parse(env).filter(|r| r.peer_id != ours);
        let Some(req) = request else {
            return dropped(ctx, "sync_rejected_request");
        };
        if let Some(reason) = admission::refusal(ctx, &req, limits, now)? {
            return dropped(ctx, reason);
        }
        peers::remember_requester(ctx, &req, now)?;
        // A round 0 gets our summary back: if it matches, the requester is
        // done; if not, it opens reconciliation in its next round. When its
        // summary shows that it surely holds ids we lack (`we_lack_some`),
        // or its reconciliation later finds some and it says we are
        // `behind`, we open our own session with it at once (unless one is
        // running), with reconciliation rather than a summary, so that they
        // move now rather than at our next tick. Opened at every difference
        // of summaries instead, that session reconciled the same difference
        // a second time whenever only the requester lacked events (and the
        // per-peer schedule let it start).
        let our_summary = match req.summary {
            Some(_) => Some(event_set(&mut self.state().sets, ctx, req.network_id)?.summary()),
            None => None,
        };
        let mut out = Vec::new();
        let lacking = req.summary.zip(our_summary);
        if req.behind || lacking.is_some_and(|(theirs, ours)| we_lack_some(&theirs, &ours)) {
            if let Some((ip, port)) = listen_addr(ctx)? {
                let target = Target {
                    to: Addr {
                        peer_id: req.peer_id,
                        network_id: req.network_id,
                        ip: req.reply_ip,
                        port: req.reply_port,
                    },
                    reply: (&ip, port),
                    candidate: false,
                };
                out.extend(self.state().start_session(ctx, target, true)?);
            }
        }
        let summary = our_summary.map_or(Value::Null, |s| Value::from(&s[..]));
        let negentropy = if req.negentropy.is_empty() {
            Value::Null
        } else {
            match self.reconcile_as_responder(ctx, &req)? {
                Ok(reply) => Value::from(reply),
                Err(e) => {
                    ctx.debug(&format!("bad negentropy message from {}: {e}", req.peer_id));
                    return dropped(ctx, "sync_rejected_request");
                }
            }
        };
        // A longer list than our limit only comes from a peer configured
        // differently (or a hostile one). The requester has taken those ids
        // off its queue, so the rest goes back as deferred, to be asked for
        // again; no longer than the request itself.
        let (need, over) = req.need.split_at(req.need.len().min(limits.max_events));
        let (events, mut deferred) = fetch_events(ctx, req.network_id, need, limits.max_events)?;
        deferred.extend(over.iter().map(|id| Value::from(**id)));
        let peers = peers::listed_for(ctx, &req)?;
        let plaintext = message([
            ("type", Value::from("sync_response")),
            ("session_id", req.session_id.into()),
            ("summary", summary),
            ("negentropy", negentropy),
            ("events", events.into()),
            ("deferred", deferred.into()),
            ("peers", peers.into()),
        ]);
        out.insert(
            0,
            envelope! {
                "event_type" => "sync_response",
                "is_outgoing" => true,
                "seal_to" => req.peer_id,
                "dest_ip" => req.reply_ip,
                "dest_port" => req.reply_port,
                "network_id" => req.network_id,
                "in_response_to" => hex::encode(req.request_id),
                "transit_secret" => req.transit_secret,
                "event_plaintext" => plaintext,
            },
        );
        Ok(out)
    }

    /// The server side of one reconciliation round.
    fn reconcile_as_responder(
        &self,
        ctx: &mut Context<'_>,
        req: &Request<'_>,
    ) -> Result<Result<Vec<u8>, negentropy::Error>, PluginError> {
        let storage = event_set(&mut self.state().sets, ctx, req.network_id)?.storage();
        let mut reconciler = Negentropy::owned(storage, FRAME_SIZE_LIMIT)?;
        if req.missing_ids {
            reconciler.answer_id_lists_with_missing_ids();
        }
        Ok(reconciler.reconcile(req.negentropy))
    }
}

/// The events of `need` we have, oldest first (so that what an event
/// depends on tends to arrive before it): at most `max_events` of them and
/// [`MAX_RESPONSE_EVENT_BYTES`] in all. Returns them, and the ids of those
/// we have but left out for size (the requester asks again next round).
fn fetch_events(
    ctx: &mut Context<'_>,
    network_id: &str,
    need: &[Id],
    max_events: usize,
) -> Result<(Vec<Value>, Vec<Value>), PluginError> {
    let mut found: Vec<(i64, Value, Value)> = Vec::new();
    for chunk in need.chunks(ID_CHUNK) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let mut args = vec![Value::from(network_id)];
        args.extend(chunk.iter().map(|id| Value::from(**id)));
        // `+network_id` keeps SQLite from choosing the network index, which
        // scans every event of the network per query (measured: 17 ms for
        // 500 ids out of 50,000, against 2.7 ms by the primary key).
        let rows = ctx.query(
            &format!(
                "SELECT created_ms, event_id, event FROM events \
                 WHERE +network_id = ? AND event_id IN ({marks})"
            ),
            &args,
        )?;
        // Taken out of the rows rather than cloned: each event is a
        // kilobyte, and a response carries a thousand.
        found.extend(rows.rows.into_iter().map(|row| {
            let mut row = row.into_iter();
            let created_ms = row.next().and_then(|v| v.as_int()).unwrap_or(0);
            let id = row.next().unwrap_or(Value::Null);
            (created_ms, id, row.next().unwrap_or(Value::Null))
        }));
    }
    found.sort_by_key(|(created_ms, _, _)| *created_ms);
    let (mut events, mut deferred, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for (_, id, event) in found {
        let size = event.as_bytes().map_or(0, <[u8]>::len);
        if events.len() < max_events && bytes + size <= MAX_RESPONSE_EVENT_BYTES {
            bytes += size;
            events.push(event);
        } else {
            deferred.push(id);
        }
    }
    Ok((events, deferred))
}

/// Whether a requester whose set has summary `theirs` surely holds ids we
/// lack, ours being `ours`: when the sets differ and theirs is no smaller.
/// (A set no smaller than ours that holds nothing we lack would be ours.)
/// Then we open our own session at once, rather than wait to be told we
/// are `behind` two round trips later: when both sides made events, both
/// directions move from the start. A smaller set may lack ids and hold
/// none we lack, and a session of ours would reconcile for nothing.
fn we_lack_some(theirs: &[u8; SUMMARY_LEN], ours: &[u8; SUMMARY_LEN]) -> bool {
    let count = |s: &[u8; SUMMARY_LEN]| u64::from_be_bytes(s[..8].try_into().expect("8 bytes"));
    theirs != ours && count(theirs) >= count(ours)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use quiet_plugin_api::{Envelope, Handler, Value};

    use crate::test_host::*;

    #[test]
    fn the_responder_sends_the_events_asked_for_up_to_the_limit() {
        let mut host = host("127.0.0.1:7002");
        add_address(&host, PEER_C, 7003, true);
        add_events(&host, 1, 0..30);
        host.run_job("sync", limits(10)).unwrap(); // sets the limit
        host.take_sent(); // the request to peer-c

        // Asked for newest first, with one id we do not have, and more ids
        // than the limit: only the first ten ids are served now.
        let mut need: Vec<Value> = vec![vec![9u8; 32].into()];
        need.extend((1..10).rev().map(|i| event_id(1, i).into()));
        need.extend((10..25).map(|i| event_id(1, i).into()));
        let request = request_from(PEER_A, new_id(), 0, need);
        let request_id = plaintext(&request, "request_id").as_bytes().unwrap();
        let request_id = hex::encode(request_id);
        host.deliver(vec![request]).unwrap();

        let sent = host.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let resp = &sent[0];
        assert_eq!(resp.event_type(), Some("sync_response"));
        assert!(resp.is_outgoing());
        assert_eq!(resp.str("seal_to"), Some(PEER_A));
        assert_eq!(resp.str("dest_ip"), Some("10.0.0.9"));
        assert_eq!(resp.int("dest_port"), Some(7009));
        assert_eq!(resp.bytes("transit_secret"), Some(&[7u8; 32][..]));
        assert_eq!(resp.str("in_response_to"), Some(request_id.as_str()));
        assert_eq!(resp.str("network_id"), Some(NET));
        for vouched in ["request_id", "network_id", "peer_id"] {
            assert_eq!(plaintext(resp, vouched), &Value::Null, "{vouched}");
        }
        assert_eq!(plaintext(resp, "negentropy"), &Value::Null);
        // The nine of those we have, oldest first.
        let events = plaintext(resp, "events").as_list().unwrap();
        let expected: Vec<Value> = (1..10)
            .map(|i| format!("event 1/{i}").into_bytes().into())
            .collect();
        assert_eq!(events, &expected[..]);
        // Those beyond the limit are deferred, for the requester to ask again.
        let deferred: Vec<Value> = (10..25).map(|i| event_id(1, i).into()).collect();
        assert_eq!(plaintext(resp, "deferred").as_list(), Some(&deferred[..]));
        let peers = plaintext(resp, "peers").as_list().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].get("peer_id").and_then(Value::as_str),
            Some(PEER_C)
        );
        assert_eq!(peers[0].get("port").and_then(Value::as_int), Some(7003));
        // The requester's address is now known.
        assert_eq!(
            host.count(&format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_A}' AND ip = '10.0.0.9' \
                 AND port = 7009 AND is_active = 1 AND last_seen_ms > 0"
            )),
            1
        );
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn events_over_the_response_size_budget_come_in_later_rounds() {
        let (a, b) = two_peers();
        let db = b.host.db();
        for i in 0..8u32 {
            db.execute(
                "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms) \
                 VALUES (?1, ?2, ?3, 'file', ?4, 0)",
                (event_id(3, i), NET, i64::from(i), vec![i as u8; 1 << 20]),
            )
            .unwrap();
        }
        let outcome = session(&a, &b, 1000);
        let mut stored = outcome.stored;
        stored.sort();
        let expected: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 20]).collect();
        assert_eq!(stored, expected);
        assert!(outcome.rounds >= 2);
    }

    #[test]
    fn id_lists_are_answered_with_only_the_missing_ids_when_asked() {
        // Both hold 20 events, B 5 more: A's reconciliation lists its 20
        // ids (fewer than negentropy splits), and B answers that list.
        let answer_to_round_1 = |ask: bool| {
            let (a, b) = two_peers();
            add_events(&a.host, 1, 0..20);
            add_events(&b.host, 1, 0..25);
            let request = a.run_job(&limits(1000)).pop().unwrap();
            let answer = b.process(&arrived(&request, PEER_A)).remove(0);
            let request = a.process(&arrived(&answer, PEER_B)).remove(0);
            assert_eq!(plaintext(&request, "missing_ids").as_bool(), Some(true));
            let request = match ask {
                true => request,
                // A requester of an earlier build does not ask.
                false => with_field(request, "missing_ids", Value::Null),
            };
            let answer = b.process(&arrived(&request, PEER_A)).remove(0);
            let next = a.process(&arrived(&answer, PEER_B));
            let reply = plaintext(&answer, "negentropy").as_bytes().unwrap().len();
            (reply, next.iter().flat_map(|r| list(r, "need")).count())
        };
        let (missing_only, need) = answer_to_round_1(true);
        assert_eq!(need, 5);
        assert!(missing_only < 6 * 32, "{missing_only} bytes");
        // Upstream's answer lists all 25, and A finds the same 5.
        let (everything, need) = answer_to_round_1(false);
        assert_eq!(need, 5);
        assert!(everything > 25 * 32, "{everything} bytes");
    }

    #[test]
    fn a_requester_whose_set_is_no_smaller_is_synced_back_from_round_0() {
        // As many events on each side, different ones: B surely lacks some
        // of A's, and opens its own session with A as it answers round 0,
        // with reconciliation rather than a summary.
        for (a_holds, b_holds) in [((1, 0..10), (2, 0..10)), ((1, 0..12), (1, 0..10))] {
            let (a, b) = two_peers();
            add_events(&a.host, a_holds.0, a_holds.1);
            add_events(&b.host, b_holds.0, b_holds.1);
            let request = a.run_job(&limits(1000)).pop().unwrap();
            let out = b.process(&arrived(&request, PEER_A));
            assert_eq!(out.len(), 2, "{out:?}");
            assert_eq!(out[1].str("seal_to"), Some(PEER_A));
            assert_eq!(plaintext(&out[1], "summary"), &Value::Null);
            assert!(plaintext(&out[1], "negentropy")
                .as_bytes()
                .is_some_and(|m| !m.is_empty()));
        }
        // A requester holding fewer, all of which B has: B opens nothing.
        let (a, b) = two_peers();
        add_events(&a.host, 1, 0..5);
        add_events(&b.host, 1, 0..10);
        let request = a.run_job(&limits(1000)).pop().unwrap();
        assert_eq!(b.process(&arrived(&request, PEER_A)).len(), 1);
    }

    #[test]
    fn a_peer_told_it_is_behind_syncs_back_at_once() {
        let (a, b) = two_peers();
        add_events(&a.host, 1, 0..10); // only A has these
        add_events(&b.host, 2, 0..20); // more: A's summary alone shows nothing
        let mut to_b: VecDeque<Envelope> = a.run_job(&limits(1000)).into();
        let (mut reverse, mut a_pulled) = (None, 0);
        while let Some(request) = to_b.pop_front() {
            let behind = plaintext(&request, "behind").as_bool() == Some(true);
            let mut out = b.process(&arrived(&request, PEER_A));
            // B answers each request, and opens its own session with A (at
            // A's reply address) when first told that it is behind, rather
            // than waiting for its next tick.
            let opens = behind && reverse.is_none();
            assert_eq!(out.len(), 1 + usize::from(opens), "{out:?}");
            if opens {
                reverse = out.pop();
            }
            for env in a.process(&arrived(&out[0], PEER_B)) {
                match env.event_type() {
                    Some("store_event") => a_pulled += 1,
                    _ => to_b.push_back(env),
                }
            }
        }
        assert_eq!(a_pulled, 20);
        let reverse = &reverse.expect("A's reconciliation found ids only it has and said so");
        assert_eq!(reverse.event_type(), Some("sync_request"));
        assert_eq!(reverse.str("seal_to"), Some(PEER_A));
        assert_eq!(reverse.int("dest_port"), Some(7001));
        assert_eq!(plaintext(reverse, "round").as_int(), Some(0));
        // The sets are known to differ: it opens with reconciliation, not a
        // summary, and pulls what A has in the rounds that follow.
        assert_eq!(plaintext(reverse, "summary"), &Value::Null);
        assert!(plaintext(reverse, "negentropy")
            .as_bytes()
            .is_some_and(|m| !m.is_empty()));
        let (mut requests, mut pulled) = (vec![reverse.clone()], 0);
        while let Some(request) = requests.pop() {
            let answer = a.process(&arrived(&request, PEER_B));
            for env in b.process(&arrived(&answer[0], PEER_A)) {
                match env.event_type() {
                    Some("store_event") => pulled += 1,
                    _ => requests.push(env),
                }
            }
        }
        assert_eq!(pulled, 10);
        // While that session runs (and before A would admit another), B's
        // job starts none with A.
        b.handler.state().sessions.clear();
        let again = b.with_ctx(|ctx| b.handler.run_job(ctx, &limits(1000)).unwrap());
        assert!(
            again.iter().all(|r| r.str("seal_to") != Some(PEER_A)),
            "{again:?}"
        );
    }

    #[test]
    fn need_beyond_the_responders_limit_is_deferred_not_lost() {
        let (a, b) = two_peers();
        b.run_job(&limits(100)); // B serves at most 100 events per round
        add_events(&b.host, 1, 0..2_500);
        let outcome = session(&a, &b, 1000);
        let mut stored = outcome.stored;
        stored.sort();
        let mut expected = event_bytes(1, 0..2_500);
        expected.sort();
        assert_eq!(stored, expected);
        assert!(outcome.rounds >= 25);
        assert!(synced_with_b(&a));
    }
}
